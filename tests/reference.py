"""Float64 single-process attention on the full sequence: the ground truth every test compares against
(:mod:`megatron_usp.testing`, re-exported for the tests' ``from reference import ...``)."""
from megatron_usp.testing import dense_mask, reference_attention, reference_max_logit, relative_error

__all__ = ["dense_mask", "reference_attention", "reference_max_logit", "relative_error"]
