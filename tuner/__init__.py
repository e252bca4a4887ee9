"""infertop's headless engine: telemetry, vLLM launcher, load generator and tuner. Never imports Textual."""

__version__ = "0.1.0"
