"""Guest-side soft-RoCE tests: they run inside the VM (`kvlane softroce run -- ... tests/softroce/guest`)
and skip anywhere else; every test here is marked `rxe`."""

from __future__ import annotations

from pathlib import Path

import pytest
from kvlane.integration.softroce import in_guest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.rxe)


@pytest.fixture(scope="session", autouse=True)
def _rxe_guest() -> None:
    if not in_guest():
        pytest.skip("needs the soft-RoCE guest (run: kvlane softroce run -- .venv/bin/pytest tests/softroce/guest)")


@pytest.fixture(scope="session")
def verbs_ucx_env() -> dict[str, str]:
    from kvlane.integration.softroce.prepare import verbs_ucx_prefix
    from kvlane.integration.softroce.ucx_verbs import ensure_verbs_ucx

    return ensure_verbs_ucx(verbs_ucx_prefix()).env()
