"""Course glue (layer 4): what runs the course rather than what it teaches.

* :mod:`qcourse.course.cli` — the ``qcourse`` command;
* :mod:`qcourse.course.run` — the course run (``qcourse course``): its cached stages, the core demo
  and the lesson notebooks; :mod:`qcourse.course.stages` — its YOLOv7 stages (lessons 5-8);
  :mod:`qcourse.course.report` — its report (markdown, self-contained HTML, results.json);
* :mod:`qcourse.course.digits` — scikit-learn's digits and the small CNN of lessons 1-4;
* :mod:`qcourse.course.plots` — the lessons' figures;
* :mod:`qcourse.course.viewer` — opening an ONNX graph in netron.

It may import every other layer; nothing imports it (ARCHITECTURE.md).
"""
