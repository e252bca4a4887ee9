"""One inference server's life: its command line, a free port, health, log classification, stop by process
group, and death with its parent; the dummy-weight model writer the tests and the GPU check serve."""
