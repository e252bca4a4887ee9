"""Everything that reads the machine: GPUs (NVML), the host (psutil), and vLLM servers (/metrics)."""
