from tests.helpers.demo_helpers import small_demo  # noqa: E402, F401  (session fixture)
