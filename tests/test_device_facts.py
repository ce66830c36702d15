"""Device-fact parsers on realistic dumps of two phones (tests/fixtures/phones/):
a Pixel 8 (Tensor G3, Android 14: 4 little + 4 mid + 1 prime core, most
thermal zones unreadable to the shell user) and a Galaxy A51 (Exynos 9611,
Android 11: no ro.soc.* properties, a Hardware line in /proc/cpuinfo).
Expected values are read off the fixture texts by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgequant.devices import facts as F

PHONES = Path(__file__).parent / "fixtures" / "phones"
SOURCES = ("getprop", "meminfo", "cpufreq", "cpus", "cpuinfo", "df", "thermalservice", "battery", "zones")


def source(phone: str, name: str) -> str:
    return (PHONES / phone / f"{name}.txt").read_text()


def device_output(phone: str, nonce: str, drop=(), crlf=False) -> str:
    """What the facts script prints on that phone."""
    parts = []
    for name in SOURCES:
        parts.append(f"{nonce} {name}")
        if name not in drop:
            parts.append(source(phone, name).rstrip("\n"))
    parts += [f"{nonce} uname", "aarch64", f"{nonce} end"]
    text = "\n".join(parts) + "\n"
    return text.replace("\n", "\r\n") if crlf else text


def phone_facts(phone: str, **kw) -> F.DeviceFacts:
    nonce = F.new_nonce()
    sections = F.split_sections(device_output(phone, nonce, **kw), nonce)
    return F.facts_from_sections("SER1", "direct", "/data/local/tmp/edgequant", sections)


def test_getprop_pixel():
    props = F.parse_getprop(source("pixel8", "getprop"))
    assert props["ro.product.model"] == "Pixel 8"
    assert props["ro.soc.model"] == "Tensor G3"
    assert props["ro.build.version.sdk"] == "34"
    assert props["ro.product.cpu.abilist32"] == ""
    assert props["vendor.debug.motd"] == "first line\nsecond line"
    assert props["vold.has_adoptable"] == "0"     # the line after a multi-line value still parses


def test_getprop_skips_garbage():
    props = F.parse_getprop(source("galaxy_a51", "getprop"))
    assert props["ro.product.model"] == "SM-A515F"
    assert props["sys.boot_completed"] == "1"
    assert "" not in props and not any("garbage" in k for k in props)


def test_meminfo():
    mem = F.parse_meminfo(source("pixel8", "meminfo"))
    assert mem["MemTotal"] == 7687384 and mem["MemAvailable"] == 3326848
    assert mem["Active(anon)"] == 1134064


def test_cpufreq_policies_pixel():
    clusters = F.parse_cpufreq_policies(source("pixel8", "cpufreq"))
    assert clusters == [F.Cluster((0, 1, 2, 3), 1704000), F.Cluster((4, 5, 6, 7), 2367000),
                        F.Cluster((8,), 2910000)]


def test_cpulist_formats():
    assert F.parse_cpulist("0 1 2 3\n") == (0, 1, 2, 3)
    assert F.parse_cpulist("0-2,6") == (0, 1, 2, 6)
    assert F.parse_cpulist("garbage 4 x-y 9-7") == (4,)


def test_per_cpu_fallback_groups_by_frequency():
    clusters = F.parse_cpu_freqs(source("galaxy_a51", "cpus"))
    assert clusters == [F.Cluster((0, 1, 2, 3), 1742000), F.Cluster((4, 5, 6, 7), 2314000)]


def test_cpuinfo():
    info = F.parse_cpuinfo(source("galaxy_a51", "cpuinfo"))
    assert info["processors"] == list(range(8))
    assert info["hardware"] == "Samsung Exynos9611"
    assert info["parts"][0] == "0xd03" and info["parts"][7] == "0xd09"
    assert F.clusters_from_cpuinfo(info) == [F.Cluster((0, 1, 2, 3), None), F.Cluster((4, 5, 6, 7), None)]


def test_df_toybox_and_wrapped():
    assert F.parse_df(source("pixel8", "df")) == 67132544
    assert F.parse_df(source("galaxy_a51", "df")) == 48125040
    wrapped = ("Filesystem           1K-blocks      Used Available Use% Mounted on\n"
               "/dev/mapper/a-very-long-volume-group-name\n"
               "                      51475068  10273132  38563212  22% /\n")
    assert F.parse_df(wrapped) == 38563212
    assert F.parse_df("df: /nope: No such file or directory\n") is None


def test_thermalservice_prefers_current_hal_temperatures():
    status, temps = F.parse_thermalservice(source("galaxy_a51", "thermalservice"))
    assert status == 1
    # the HAL's current values (38.5 for AP), not the cached ones (38.0); the NaN sensor dropped
    assert temps == [F.Temperature("AP", 38.5), F.Temperature("BAT", 33.2), F.Temperature("SKIN", 36.7)]
    status, temps = F.parse_thermalservice(source("pixel8", "thermalservice"))
    assert status == 0
    assert [t.name for t in temps] == ["battery", "BIG", "LITTLE", "MID", "VIRTUAL-SKIN", "G3D"]
    assert temps[1].celsius == pytest.approx(41.212)


def test_battery():
    b = F.parse_battery(source("pixel8", "battery"))
    assert b == {"level": 78, "celsius": 28.7, "mv": 4123, "powered": ["usb"]}
    b = F.parse_battery(source("galaxy_a51", "battery"))
    assert b["level"] == 64 and b["celsius"] == pytest.approx(33.1) and b["powered"] == ["ac"]


def test_thermal_zones_skip_unreadable_and_nonsense():
    temps = F.parse_thermal_zones(source("pixel8", "zones"))
    assert temps == [F.Temperature("battery", 29.9), F.Temperature("VIRTUAL-SKIN", 31.834)]
    temps = F.parse_thermal_zones(source("galaxy_a51", "zones"))
    assert [t.name for t in temps] == ["BIG", "LITTLE", "G3D", "ISP", "battery"]   # -273 °C dropped


def test_pixel_facts_end_to_end():
    f = phone_facts("pixel8")
    assert (f.model, f.manufacturer, f.soc) == ("Pixel 8", "Google", "Google Tensor G3")
    assert (f.abi, f.android_release, f.sdk) == ("arm64-v8a", "14", 34) and f.is_arm64
    assert (f.ram_total_kib, f.ram_available_kib) == (7687384, 3326848)
    assert f.cpu_count == 9 and len(f.clusters) == 3
    assert f.workdir_free_kib == 67132544
    assert f.thermal_status == 0 and f.thermal_status_name == "none"
    assert (f.battery_level, f.battery_celsius, f.battery_mv) == (78, 28.7, 4123)
    # 1 prime + 4 mid + 4 little: every core but the little cluster
    assert F.recommended_threads(f) == 5


def test_samsung_facts_end_to_end_with_crlf():
    f = phone_facts("galaxy_a51", crlf=True)  # a pty-mode adbd ends lines with \r\n
    assert (f.model, f.manufacturer) == ("SM-A515F", "samsung")
    assert f.soc == "exynos9611"                # no ro.soc.* before Android 12: the board platform
    assert f.abis == ["arm64-v8a", "armeabi-v7a", "armeabi"]
    assert (f.android_release, f.sdk) == ("11", 30)
    assert f.thermal_status_name == "light"
    assert F.recommended_threads(f) == 4


def test_fallbacks_when_sources_are_missing():
    # no cpufreq policies: per-CPU max frequencies give the same clusters
    f = phone_facts("galaxy_a51", drop=("cpufreq",))
    assert [c.cpus for c in f.clusters] == [(0, 1, 2, 3), (4, 5, 6, 7)] and F.recommended_threads(f) == 4
    # no frequencies at all: core parts group the CPUs; threads fall back to every CPU
    f = phone_facts("galaxy_a51", drop=("cpufreq", "cpus"))
    assert [c.cpus for c in f.clusters] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert F.recommended_threads(f) == 8
    # no thermal service (a Linux board): the readable thermal zones
    f = phone_facts("galaxy_a51", drop=("thermalservice", "getprop"))
    assert f.thermal_status is None and [t.name for t in f.temperatures][:2] == ["BIG", "LITTLE"]
    assert f.abi == "aarch64" and f.is_arm64 and f.soc == "Samsung Exynos9611"


def test_recommended_threads_counts_every_cluster_above_the_slowest():
    f = F.DeviceFacts("s", "direct", clusters=[F.Cluster((0, 1, 2), 2016000), F.Cluster((3, 4), 2803200),
                                                F.Cluster((5, 6), 2803200)])
    assert F.recommended_threads(f) == 4
    f = F.DeviceFacts("s", "direct", clusters=[F.Cluster((0, 1, 2, 3), 1785600), F.Cluster((4, 5, 6), 2496000),
                                                F.Cluster((7,), 2995200)])
    assert F.recommended_threads(f) == 4
    assert F.recommended_threads(F.DeviceFacts("s", "direct")) == 4


def test_sections_need_the_nonce():
    nonce = F.new_nonce()
    out = f"{nonce} getprop\n[a.b]: [1]\n@@eqfacts-forged meminfo\nMemTotal: 5 kB\n{nonce} end\n"
    sections = F.split_sections(out, nonce)
    assert set(sections) == {"getprop", "end"}
    assert "MemTotal" in sections["getprop"]   # a forged header is just text of the section


def test_hostile_values_are_clipped():
    props = "[ro.product.model]: [" + "A\x1b[31m" * 100 + "]\n"
    nonce = F.new_nonce()
    f = F.facts_from_sections("s", "direct", "/w", F.split_sections(f"{nonce} getprop\n{props}", nonce))
    assert len(f.model) <= F.MAX_VALUE and "\x1b" not in f.model
    assert F.parse_battery("  level: 99999999999999999999\n  temperature: abc\n")["level"] is None
