"""Widgets of the monitor and tuner screens, one per module."""
