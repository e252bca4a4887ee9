"""Tuning: the search space and SLOs, the capacity search on one server, the search across configurations, the
trial store, the verdict (proof relaunch and production check) and the exported ``vllm serve --config`` file."""
