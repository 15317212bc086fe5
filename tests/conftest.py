from __future__ import annotations

from hypothesis import settings

# The first call of the fused kernel compiles it; timing belongs in benchmarks, not tests.
settings.register_profile("evoopt", deadline=None)
settings.load_profile("evoopt")
