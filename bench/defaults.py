"""Defaults the bench's commands and its library share, in a module light enough for `flowsort --help`."""

DEFAULT_GATE_THRESHOLD = 0.9  # GateConfig's default min_probability
ENGINES = ("auto", "openvino", "torch", "tensorrt", "cuda")
# The simulated instrument's.
DEFAULT_RATE = 1000.0
DEFAULT_SECONDS = 20.0
DEFAULT_TRANSIT_MS = 10.0
DEFAULT_POOL = 4096
