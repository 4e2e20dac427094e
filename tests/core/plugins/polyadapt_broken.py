"""A plugin whose dependency is missing: it must fail alone, without breaking the others."""

import polyadapt_dependency_that_does_not_exist  # noqa: F401
