import pytest


@pytest.fixture(scope="session")
def small_demo(tmp_path_factory):
    from demo_helpers import build_small_demo

    return build_small_demo(tmp_path_factory.mktemp("demo") / "demo")
