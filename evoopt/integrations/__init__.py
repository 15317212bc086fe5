"""Other tools' entry points into evoopt: the lm-evaluation-harness model (:mod:`~evoopt.integrations.lm_eval`)."""
