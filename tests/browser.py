"""The headless browser for the tests that look at a page (tinyalign.page's, Debian's `chromium`).

On a laptop without Chromium those tests are skipped with the command to install it; under .ci/run,
which installs it and sets TINYALIGN_NEED_BROWSER=1, a missing browser fails them instead, so CI never
passes without having looked.
"""

import os

import pytest

from tinyalign.lab import page


def rendered_dom(path) -> str:
    if page.find_browser() is None:
        message = "no headless browser: install Debian's chromium (apt-get install chromium) to run this test"
        if os.environ.get("TINYALIGN_NEED_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    return page.rendered_dom(path)
