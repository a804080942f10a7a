"""Course glue (layer 4): what runs the course rather than what it teaches.

* :mod:`qcourse.course.cli` — the ``qcourse`` command;
* :mod:`qcourse.course.run` — the course run: the core demo and the lesson notebooks;
* :mod:`qcourse.course.digits` — scikit-learn's digits and the small CNN of lessons 1-4;
* :mod:`qcourse.course.plots` — the lessons' figures;
* :mod:`qcourse.course.viewer` — opening an ONNX graph in netron.

It may import every other layer; nothing imports it (ARCHITECTURE.md).
"""
