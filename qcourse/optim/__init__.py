"""Lesson 7 helpers for quantization-aware training: ``qcourse.optim.helper``.

Parameter groups, freezing and in-place weight quantization, under the names of
``pytorch_quantization.optim.helper``. ``optim`` sits on top of the toolkit and may use
any of it.
"""
from qcourse.optim import helper
from qcourse.optim.helper import freeze_parameters, group_parameters, match_parameters, quant_weight_inplace

__all__ = ["helper", "match_parameters", "group_parameters", "freeze_parameters", "quant_weight_inplace"]
