from tests.helpers.demo_helpers import small_demo  # noqa: F401  (session fixture)
