"""``python -m fusednorm``: what this installation has (versions, backends, CPU ISA, GPU)."""
from .info import format_info, info

print(format_info(info()))
