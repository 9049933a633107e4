"""Shared test configuration.

Hypothesis: a modest number of examples and no deadline (the first example
of a new dtype/layout compiles Numba kernels for seconds). ``derandomize``
keeps the default profile reproducible; ``HYPOTHESIS_PROFILE=thorough``
explores more, with random seeds.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=30, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
