"""Planning, on top of finetune: the hardware probe (and a training worker's matmul measurement, precision.py), the
memory estimator, plan selection and the search stage. No Django; torch only inside the functions that measure or
train, never at import."""
from .estimate import estimate
from .probe import probe
from .select import select

__all__ = ["estimate", "probe", "select"]
