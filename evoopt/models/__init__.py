"""Models as files: sources and reference schemes (:mod:`~evoopt.models.io`), atomic writes, target
load and export, the data-flow path models (:mod:`~evoopt.models.paths`) and the per-tensor
statistics of Fisher and RegMean merging (:mod:`~evoopt.models.statistics`)."""
