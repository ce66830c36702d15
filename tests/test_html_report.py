"""`edgequant report RUN --html`: a self-contained page, checked as HTML and as a real browser renders it.

The store is a real SQLite results database filled through the Store API with
figures chosen here (three nightly runs of one model, the last on the host and
a phone, one model output that tries script injection).  Headless Chromium
renders the page to a PNG (and dumps the DOM it built), so the checks are on
what a browser does with it, not only on the text.
"""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_one_line_error, cli_env, run_cli
from edgequant.results.html import history, render_html
from edgequant.results.store import Measurement, RowKey, Store

MiB = 1024 * 1024
MODEL = "org/tiny-med"
RUNGS = ["BF16", "Q8_0", "Q4_K_M", "Q4_0"]
HOST = "host:testbox"
PHONE = "adb:R58M123ABC"
INJECTION = '<script>document.title="pwned"</script><img src=x onerror="document.title=1">https://evil.example/a.png'

# per rung: size MiB, tg t/s on the host (per night), xml parse rate
SIZE = {"BF16": 512.0, "Q8_0": 272.0, "Q4_K_M": 168.0, "Q4_0": 155.0}
TG = {"BF16": [40.0, 41.0, 42.0], "Q8_0": [60.0, 61.0, 62.0], "Q4_K_M": [80.0, 81.0, 82.0],
      "Q4_0": [90.0, 91.0, 92.0]}
XML = {"BF16": 1.0, "Q8_0": 1.0, "Q4_K_M": 0.75, "Q4_0": 0.25}


def _key(quant: str, device_id: str, quality: bool = False, model: str = MODEL) -> RowKey:
    if device_id.startswith("host"):
        device = {"kind": "host", "hostname": "testbox", "cpu_model": "Test CPU 9000", "physical_cores": 2,
                  "os": "Linux 6.1"}
        params = {"runner": "host", "threads": 2, "n_prompt": 64, "n_gen": 16, "repetitions": 3, "warmup": 1}
    else:
        device = {"kind": "android", "serial": "R58M123ABC", "model": "SM-A515F", "manufacturer": "samsung",
                  "soc": "Exynos 9611", "cpu_model": "samsung SM-A515F", "physical_cores": 8}
        params = {"runner": "device", "threads": 4, "n_prompt": 64, "n_gen": 16, "repetitions": 3, "warmup": 1}
    if quality:
        params = {"runner": "host", "stage": "quality", "suite": "triage", "n_cases": 4, "prompting": "completion"}
    return RowKey(model_id=model, model_hash="h-" + model, quant=quant, artifact_sha256=f"sha-{quant}",
                  is_reference=quant == "BF16", device_id=device_id, device=device, runtime="llama.cpp",
                  runtime_version="0.3.36", params=params)


def _bench(quant: str, tg: float) -> list[Measurement]:
    return [Measurement("size", SIZE[quant] * MiB, "bytes"), Measurement("bpw", SIZE[quant] / 32, "bits/weight"),
            Measurement("load_time", 0.2, "s", None, 1), Measurement("pp_tps", tg * 10, "t/s", 3.0, 3),
            Measurement("tg_tps", tg, "t/s", 0.5, 3), Measurement("ttft", 50.0, "ms", 1.0, 3),
            Measurement("peak_rss", (SIZE[quant] + 100) * MiB, "bytes"),
            Measurement("peak_rss_anon", 60 * MiB, "bytes"), Measurement("peak_rss_file", SIZE[quant] * MiB, "bytes")]


def _quality(quant: str) -> list[Measurement]:
    rows = [Measurement("xml_parse_rate", XML[quant], "ratio", None, 4,
                        {"ci95": [0.4, 1.0], **({} if quant == "BF16" else
                                                {"delta_pp": (XML[quant] - 1) * 100, "p_value": 0.5,
                                                 "significant": False})}),
            Measurement("gates_pass", 1.0 if XML[quant] >= 0.95 else 0.0, "bool", None, 1,
                        {"gates": [{"gate": "xml_parse_rate >= 0.95", "metric": "xml_parse_rate",
                                    "value": XML[quant], "pass": XML[quant] >= 0.95}]})]
    if quant != "BF16":
        rows.append(Measurement("referral_agreement", XML[quant], "ratio", None, 4))
    return rows


def _cases(quant: str) -> list[dict]:
    n_ok = int(XML[quant] * 4)
    out = []
    for i in range(4):
        ok = i < n_ok
        text = f"<triage><referral>yes</referral><differential>malaria {i}</differential></triage>"
        if not ok:
            text = INJECTION if quant == "Q4_0" and i == 3 else "garbled <triage"
        out.append({"case_id": f"xml-{i}", "format": "xml", "ok": ok, "refusal": False,
                    "reason": None if ok else "not well-formed XML: unclosed token",
                    "fields": {"referral": True, "differential": [f"malaria {i}"]} if ok else {},
                    "output": text, "stopped": "stop", "n_tokens": 20})
    return out


def populate(db: Path) -> dict:
    """Three nightly runs of MODEL (the last also on a phone) and one run of another model."""
    runs = []
    with Store(db) as store:
        for night in range(3):
            run_id = store.start_run("edgequant run", "default", MODEL, "h-" + MODEL)
            for quant in RUNGS:
                store.record_rung(run_id, _key(quant, HOST), _bench(quant, TG[quant][night]))
                store.record_rung(run_id, _key(quant, HOST, quality=True), _quality(quant), status=None,
                                  cases=_cases(quant), suite="triage")
                if night == 2:
                    store.record_rung(run_id, _key(quant, PHONE), _bench(quant, TG[quant][night] / 4))
            store.finish_run(run_id, "complete")
            runs.append(run_id)
            if night == 0:
                other = store.start_run("edgequant run", "default", "org/other", "h-other")
                store.record_rung(other, _key("BF16", HOST, model="org/other"), _bench("BF16", 999.0))
                store.finish_run(other, "complete")
    return {"runs": runs, "other": other}


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html_report")
    db = tmp / "results.db"
    info = populate(db)
    out = tmp / "report.html"
    result = run_cli("report", info["runs"][-1], "--html", str(out), "--db", str(db), env=cli_env(tmp), timeout=120)
    assert result.returncode == 0, result.stderr
    return {"tmp": tmp, "db": db, "html": out.read_text(encoding="utf-8"), "path": out, **info}


class _Page(HTMLParser):
    """Sections, tables (as lists of rows of cell texts), images, every attribute and tag."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str, str]] = []
        self.tables: list[tuple[str, list[list[str]]]] = []   # (section id, rows)
        self.images: list[str] = []
        self.headings: dict[str, str] = {}                   # section id -> its h2 text
        self._h2: list[str] | None = None
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for k, v in attrs:
            self.attrs.append((tag, k, v or ""))
        d = dict(attrs)
        if tag == "section":
            self._section = d.get("id", "")
        elif tag == "table":
            self.tables.append((self._section, []))
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(d.get("src", ""))
        elif tag == "h2":
            self._h2 = []

    def handle_endtag(self, tag):
        if tag == "h2" and self._h2 is not None:
            self.headings[self._section] = "".join(self._h2)
            self._h2 = None
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[-1][1].append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._h2 is not None:
            self._h2.append(data)
        if self._cell is not None:
            self._cell.append(data)


def parse(html: str) -> _Page:
    p = _Page()
    p.feed(html)
    return p


def _png_pixels(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def _assert_not_blank(pixels: np.ndarray, min_share: float = 0.01) -> None:
    """Not one flat colour: a real share of pixels differs clearly from the background (the corner)."""
    background = pixels[0, 0]
    differs = np.abs(pixels - background).sum(axis=2) > 60
    assert differs.mean() > min_share, f"only {differs.mean():.3%} of pixels differ from the background"


# ---------------------------------------------------------------------------
# the page as HTML


def test_comparison_table_per_device_has_the_stored_rungs(page):
    p = parse(page["html"])
    tables = {}
    for section, rows in p.tables:
        if rows and rows[0][:2] == ["rung", "size MiB"]:
            tables[p.headings[section].split(" · ")[0]] = rows
    assert set(tables) == {HOST, PHONE}
    for rows in tables.values():
        assert [r[0] for r in rows[1:]] == ["BF16 (ref)", "Q8_0", "Q4_K_M", "Q4_0"]
    header = tables[HOST][0]
    assert header[5] == "tg16 t/s"
    # the last night: Q4_0 generates 92 ± 0.5 t/s on the host, 92 / 4 on the phone; speedup 92 / 42
    assert tables[HOST][4][5] == "92.0 ± 0.5"
    assert tables[HOST][4][header.index("tg ×")] == f"{92 / 42:.2f}"
    assert tables[PHONE][4][5] == f"{92 / 4:.1f} ± 0.5"
    assert tables[HOST][3][1] == f"{SIZE['Q4_K_M']:.1f}"
    assert "samsung SM-A515F Exynos 9611" in p.headings["device-2"] + p.headings["device-1"]


def test_quality_table_and_gate_failures(page):
    p = parse(page["html"])
    quality = [rows for _, rows in p.tables if rows and rows[0][:2] == ["rung", "xml %"]]
    assert len(quality) == 2          # the phone shares the host's quality figures (same GGUF files)
    rows = quality[0]
    gates_col = rows[0].index("ship gates")   # the absolute gates; "relative gates" beside them when declared
    assert [r[0] for r in rows[1:]] == ["BF16 (ref)", "Q8_0", "Q4_K_M", "Q4_0"]
    assert [r[gates_col] for r in rows[1:]] == ["PASS", "PASS", "FAIL (1)", "FAIL (1)"]
    assert rows[4][1].startswith("25 -75")
    assert "quality measured on host:testbox" in page["html"]


def test_page_is_self_contained(page):
    html = page["html"]
    p = parse(html)
    for tag, name, value in p.attrs:
        if name in ("src", "href", "action", "formaction", "poster", "srcset", "background", "data"):
            assert value.startswith(("data:image/png;base64,", "#")), (tag, name, value[:80])
    assert "script" not in p.tags and "link" not in p.tags and "iframe" not in p.tags
    assert "@import" not in html and not re.search(r"url\(", html)
    csp = [v for t, k, v in p.attrs if t == "meta" and k == "content" and "default-src 'none'" in v]
    assert csp, "the page declares a Content-Security-Policy"
    # the only address in the page is the text of the hostile model output
    assert re.findall(r"(?i)(?:https?|ftp|wss?)://[^\s<\"']*", html) == ["https://evil.example/a.png"]


def test_model_output_is_escaped(page):
    html = page["html"]
    assert '<script>document.title="pwned"</script>' not in html
    assert "&lt;script&gt;document.title=&quot;pwned&quot;&lt;/script&gt;" in html
    assert "<img src=x" not in html
    p = parse(html)
    assert INJECTION in "".join(p.text)   # shown to the reader as the text it was


def test_plots_are_real_pngs(page):
    p = parse(page["html"])
    pngs = [base64.b64decode(src.split(",", 1)[1]) for src in p.images]
    assert len(pngs) == 4                 # per device: Pareto and history
    for data in pngs:
        pixels = _png_pixels(data)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 400
        _assert_not_blank(pixels)
        assert b"matplotlib.org" not in data


def test_pareto_front_is_named(page):
    # (quality, tg, size): Q4_0 is fastest and smallest, BF16 the best quality; Q8_0 matches BF16's quality
    # and is faster and smaller, so it dominates BF16; Q4_K_M has better quality than Q4_0
    notes = re.findall(r"Pareto front \(better quality, faster, smaller; no rung beats these on all three\): "
                       r"([^.]*)\.", page["html"])
    assert notes and set(notes[0].split(", ")) == {"Q8_0", "Q4_K_M", "Q4_0"}


def test_per_case_detail_shows_every_case_and_reason(page):
    p = parse(page["html"])
    cases = [rows for _, rows in p.tables if rows and rows[0][:3] == ["case", "format", "parse"]]
    assert len(cases) == len(RUNGS)       # under the host, where the eval ran; the phone's section points there
    assert "The eval cases are shown under host:testbox." in page["html"]
    q4_0 = cases[3]
    assert [r[2] for r in q4_0[1:]] == ["ok", "FAIL", "FAIL", "FAIL"]
    assert q4_0[2][3] == "not well-formed XML: unclosed token"
    assert "Q4_0 · 1/4 parsed · 3 failed" in page["html"]


def test_history_follows_the_model_over_runs(page):
    with Store(page["db"]) as store:
        run = store.run(page["runs"][-1])
        series = history(store, run, "parse_rate")
        assert set(series) == {HOST, PHONE}
        host = series[HOST]
        assert set(host) == set(RUNGS)
        assert [pt.tg_tps for pt in host["Q4_K_M"]] == TG["Q4_K_M"]          # oldest first, other model left out
        assert [pt.run_id for pt in host["Q4_K_M"]] == page["runs"]
        assert [pt.quality for pt in host["Q4_0"]] == [XML["Q4_0"]] * 3
        assert [pt.tg_tps for pt in series[PHONE]["BF16"]] == [TG["BF16"][2] / 4]
        # an earlier run's page has only the history up to that run
        first = history(store, store.run(page["runs"][0]), "parse_rate")
        assert [pt.tg_tps for pt in first[HOST]["BF16"]] == [TG["BF16"][0]]


def test_written_atomically_and_bad_input(page, tmp_path):
    leftovers = [f.name for f in page["path"].parent.iterdir() if ".partial" in f.name]
    assert leftovers == []
    env = cli_env(tmp_path)
    r = run_cli("report", "nope", "--html", str(tmp_path / "x.html"), "--db", str(page["db"]), env=env, timeout=120)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "nope")
    assert not (tmp_path / "x.html").exists()
    r = run_cli("report", page["runs"][-1], "--html", str(tmp_path / "x.html"), "--quality", "bogus",
                "--db", str(page["db"]), env=env, timeout=120)
    assert r.returncode == 2
    assert_one_line_error(r.stderr, "bogus", "parse_rate")


def test_render_without_quality_or_history(tmp_path):
    with Store(tmp_path / "r.db") as store:
        run_id = store.start_run("edgequant run --no-quality", "quick", "org/solo", "h-solo")
        for quant in ("BF16", "Q4_0"):
            store.record_rung(run_id, _key(quant, HOST, model="org/solo"), _bench(quant, TG[quant][0]))
        store.finish_run(run_id, "complete")
        html = render_html(store, run_id)
    p = parse(html)
    assert "No quality figures in this run" in html
    assert "Pareto front on speed and size alone (faster, smaller): Q4_0." in html   # faster and smaller than BF16
    assert len(p.images) == 2
    for src in p.images:
        _assert_not_blank(_png_pixels(base64.b64decode(src.split(",", 1)[1])))


# ---------------------------------------------------------------------------
# the page as a browser renders it

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(prefix="eq-chromium-")
    try:
        return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs it: .ci/system-deps)")
def test_chromium_renders_the_page(page, tmp_path):
    shot = page["tmp"] / "report.png"
    r = _chromium(f"--screenshot={shot}", "--window-size=1400,2400", page["path"].as_uri())
    assert shot.is_file(), r.stderr[-2000:]
    pixels = _png_pixels(shot.read_bytes())
    assert pixels.shape[:2] == (2400, 1400)
    _assert_not_blank(pixels, 0.03)
    # the browser's own DOM: no script element came out of the model output, the title is untouched
    dom = _chromium("--dump-dom", page["path"].as_uri()).stdout
    assert "<script" not in dom.lower()
    assert re.search(r"<title>edgequant · run [^<]*</title>", dom)
    assert "pwned" in dom and "&lt;script&gt;document.title=" in dom
