"""A real browser for the page's tests and ``make screenshots``: headless Chromium driven by Playwright's
Python API, with the system's browser (``/usr/bin/chromium``, or ``STYLEQUEUE_CHROMIUM``; nothing is
downloaded), and the steps both take: images to upload, signing in, filling and sending the submit form.
No pytest here (the screenshot script imports it)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.support.images import EXAMPLES

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page, ViewportSize

CHROMIUM = Path(os.environ.get("STYLEQUEUE_CHROMIUM", "/usr/bin/chromium"))
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
CONTENTS = ("content_astronaut.png", "content_colosseum.jpg")
STYLES = ("style_hokusai_great_wave.jpg", "style_vangogh_night_cafe.jpg")


def missing() -> str | None:
    """Why no browser test can run here, or None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[dev]')"
    if not CHROMIUM.exists():
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    return None


@contextmanager
def chromium() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


def square_images(folder: Path, size: int = 64) -> dict[str, Path]:
    """The example images cropped square and made small (PNG files in ``folder``), by name."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name in (*CONTENTS, *STYLES):
        image = Image.open(EXAMPLES / name).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size))
        path = folder / (name.rsplit(".", 1)[0] + ".png")
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        path.write_bytes(buf.getvalue())
        out[name] = path
    return out


def sign_in(page: Page, base: str, key: str) -> None:
    page.goto(f"{base}/web")
    page.get_by_label("API key").fill(key)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(re.compile(r".*/web/batches$"))


def drop_file(page: Page, zone: str, path: Path) -> None:
    """Drop a file on a drop zone as a user dragging it from their desktop would."""
    data = list(path.read_bytes())
    transfer = page.evaluate_handle(
        """([bytes, name]) => {
            const t = new DataTransfer();
            t.items.add(new File([new Uint8Array(bytes)], name, { type: "image/png" }));
            return t;
        }""",
        [data, path.name],
    )
    page.dispatch_event(zone, "drop", {"dataTransfer": transfer})


def fill_submit_form(
    page: Page, base: str, contents: list[Path], styles: list[Path], params: dict[str, Any]
) -> None:
    """The submit form with these images (the first style dropped, the others chosen) and params."""
    page.goto(f"{base}/web/submit")
    page.set_input_files("#content-files", [str(p) for p in contents])
    drop_file(page, "#style-drop", styles[0])
    if styles[1:]:
        page.set_input_files("#style-files", [str(p) for p in styles[1:]])
    for name, value in params.items():
        page.fill(f"#p-{name}", str(value))
    jobs = len(contents) * len(styles)
    page.wait_for_function(
        "n => document.getElementById('estimate').textContent.includes(n + ' jobs')", arg=jobs
    )


def submit(page: Page) -> str:
    """Send the filled form; the new batch's id (its page is open then)."""
    page.get_by_role("button", name="Submit batch").click()
    page.wait_for_url(re.compile(r".*/web/batches/[0-9a-f-]{36}$"))
    return page.url.rsplit("/", 1)[-1]


__all__ = [
    "CHROMIUM",
    "VIEWPORT",
    "chromium",
    "drop_file",
    "fill_submit_form",
    "missing",
    "sign_in",
    "square_images",
    "submit",
]
