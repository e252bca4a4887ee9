"""Predict, then measure: performance estimates of vLLM configurations before any launch.

:mod:`tuner.predict.base` holds the shapes of a prediction; :mod:`tuner.predict.aic` asks NVIDIA's
aiconfigurator (the ``predict`` extra) for them; :mod:`tuner.predict.roofline` gives the memory-bandwidth
ceiling every GPU has, with or without the extra.
"""
