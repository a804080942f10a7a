"""Figures for the lessons (matplotlib). Each function returns the ``Figure`` it drew.

``qcourse.course.plots.basics`` holds lessons 1-2 (bit layouts, the quantization staircase,
MSE vs amax, per-channel error, the STE gradient); ``qcourse.course.plots.calibration`` holds
lessons 3-4 (activation histograms with each calibrator's amax, method comparisons);
``qcourse.course.plots.ptq`` holds lesson 5 (mAP per method, per-layer ranges, tied groups).
"""
from qcourse.course.plots.basics import *  # noqa: F401,F403
from qcourse.course.plots.calibration import *  # noqa: F401,F403
from qcourse.course.plots.ptq import *  # noqa: F401,F403
from qcourse.course.plots.engines import *  # noqa: F401,F403
from qcourse.course.plots.sensitivity import *  # noqa: F401,F403
from qcourse.course.plots import basics as _b, calibration as _c, ptq as _p

__all__ = [*_b.__all__, *_c.__all__, *_p.__all__]
