"""Pure-Python auto-selector: GPU probe, memory estimator and plan selection. No Django, no torch."""
from .estimate import estimate
from .probe import probe
from .select import select

__all__ = ["estimate", "probe", "select"]
