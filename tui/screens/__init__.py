"""Screens of the infertop app."""
