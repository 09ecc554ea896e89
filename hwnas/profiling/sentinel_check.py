"""Is a stored profile valid here? The fingerprint's verdict, then the profile's sentinel network timed now.

A profile of *this machine* (or one too old to tell) is used only when its sentinel, timed here with the
profile's own methodology and statistic, lands within the profile's own noise: a machine 15 % faster or
slower with the same fingerprint (another host type behind a generic "AMD EPYC", a different power state)
is caught before its predictions drive a search, a budget or an export. A profile of *another device*
predicts that device; hwnas never compares it with timings taken here.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from hwnas.profiling import timer
from hwnas.profiling.device_profile import DeviceProfile
from hwnas.profiling.fingerprint import FingerprintMatch, compare_fingerprints
from hwnas.space.genotype import Genotype

log = logging.getLogger(__name__)

MIN_TOLERANCE = 0.05  # even a noise-free profile allows this much: the sentinel level itself moves a few %
MAX_TOLERANCE = 0.12  # below 15 %: a machine >= 15 % faster or slower is always caught
NOISE_QUANTILE = 0.9  # of the profile's repeatability: |A/B - 1| of its validation networks' two measurements
PARTNERS = 2  # calibration networks the sentinel is paired with, as in the profile's own rounds
ATTEMPTS = 2  # a check that fails is timed once more: a burst from another tenant rarely lasts two checks
OVERRIDE_FLAG = "--trust-profile"
FOREIGN_NOTE = "not measured here: profile is for device {device}; re-measure on that device with the runner bundle"
SentinelTimer = Callable[[DeviceProfile], float]  # profile -> sentinel ms now


def sentinel_arch(profile: DeviceProfile) -> Genotype:
    """The profile's sentinel network as stored in it (never regenerated: a newer sampler may draw another)."""
    arch = profile.sentinel.get("arch") if isinstance(profile.sentinel, dict) else None
    if not arch and isinstance(profile.sentinel, dict) and profile.sentinel.get("arch_id"):
        from hwnas.profiling.profiler import sentinel_genotype

        seeded = sentinel_genotype(profile.macro)  # a profile storing only the id: the seeded network, if it is that
        if seeded.arch_id == profile.sentinel["arch_id"]:
            return seeded
    if not arch:
        raise ValueError(f"profile {profile.name!r} stores no sentinel network (sentinel.arch)")
    try:
        g = Genotype.from_dict(arch)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"profile {profile.name!r}: sentinel.arch is not an architecture ({err})") from None
    stored_id = profile.sentinel.get("arch_id")
    if stored_id is not None and stored_id != g.arch_id:
        raise ValueError(f"profile {profile.name!r}: sentinel.arch_id {stored_id!r} does not match sentinel.arch ({g.arch_id})")
    if g.macro != profile.macro:
        raise ValueError(f"profile {profile.name!r}: sentinel.arch is for another macro than the profile")
    return g


def profile_timing(profile: DeviceProfile) -> timer.TimingConfig:
    """The timing configuration the profile was measured with (provider from the device block if older)."""
    timing = profile.device.get("timing")
    if not isinstance(timing, dict):
        raise ValueError(f"profile {profile.name!r}: device.timing is missing")
    timing = dict(timing)
    timing.setdefault("provider", profile.device.get("provider", "CPUExecutionProvider"))
    timing.setdefault("provider_options", profile.device.get("provider_options", {}))
    try:
        return timer.TimingConfig(**timing)
    except (TypeError, ValueError) as err:
        raise ValueError(f"profile {profile.name!r}: device.timing is not a timing configuration ({err})") from None


def _partners(profile: DeviceProfile, k: int) -> list[Genotype]:
    """Up to k of the profile's calibration networks (the sentinel's partners in its rounds); else the sentinel."""
    from hwnas.profiling.profiler import entry_genotype

    out = []
    for entry in profile.calibration[:k]:
        try:
            out.append(entry_genotype(profile.macro, entry))
        except (KeyError, TypeError, ValueError):
            continue
    return out or [sentinel_arch(profile)]


def measure_sentinel(profile: DeviceProfile, pairs: int | None = None, partners: int = PARTNERS) -> float:
    """The profile's sentinel level now (ms): its stored sentinel timed with its timing config, statistic and pairing.

    As in the profile's rounds, the sentinel shares the device with a calibration network (interleaved runs,
    fresh sessions); the level is `timer.sentinel_median` (median of a moving minimum of session medians)
    over `pairs` records, by default one drift window (2 * drift_window + 1).
    """
    from hwnas.profiling.profiler import network_candidate

    tcfg = profile_timing(profile)
    sentinel = network_candidate("sentinel", sentinel_arch(profile), batch=tcfg.batch)
    cands = [network_candidate(f"partner{i}:{g.arch_id}", g, batch=tcfg.batch)
             for i, g in enumerate(_partners(profile, partners))]
    pairs = pairs or 2 * tcfg.drift_window + 1
    records: list[timer.Record] = []
    for r in range(math.ceil(pairs / len(cands))):
        records += timer.run_round(cands, r, tcfg, sentinel, seed=r)
    return timer.sentinel_median(records[:pairs], tcfg.drift_window)


def tolerance(profile: DeviceProfile) -> float:
    """How far (relative) the sentinel may be off: the profile's own noise, within [5 %, 12 %].

    The noise is the 90th percentile of |A/B - 1| over the validation networks the profile measured twice
    (even vs odd rounds); a profile that stores none gets the ceiling.
    """
    try:
        a = np.array([e["latency_ms_a"] for e in profile.validation_set], dtype=float)
        b = np.array([e["latency_ms_b"] for e in profile.validation_set], dtype=float)
    except (KeyError, TypeError, ValueError):
        return MAX_TOLERANCE
    ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
    if ok.sum() < 3:
        return MAX_TOLERANCE
    noise = float(np.quantile(np.abs(a[ok] / b[ok] - 1), NOISE_QUANTILE))
    return float(min(max(noise, MIN_TOLERANCE), MAX_TOLERANCE))


@dataclass(frozen=True)
class SentinelCheck:
    """The sentinel measured here vs in the profile; ok when the ratio lies within the tolerance (both ways)."""

    profile: str
    measured_ms: float
    profiled_ms: float
    tolerance: float
    attempts: tuple[float, ...] = ()  # the ratio of every attempt

    @property
    def ratio(self) -> float:
        """Measured here / profiled."""
        return self.measured_ms / self.profiled_ms

    @property
    def ok(self) -> bool:
        """Within the profile's noise: |log ratio| <= log(1 + tolerance), so 1.15x and 0.85x are both caught."""
        return math.isfinite(self.ratio) and abs(math.log(self.ratio)) <= math.log1p(self.tolerance)

    def message(self) -> str:
        """One plain line: measured vs profiled ms, the ratio, the tolerance."""
        verdict = "within" if self.ok else "OFF by more than"
        return (f"profile {self.profile!r}: its sentinel network runs at {self.measured_ms:.4g} ms here vs "
                f"{self.profiled_ms:.4g} ms in the profile (ratio {self.ratio:.2f}), {verdict} the profile's noise "
                f"(+-{100 * self.tolerance:.0f} %)")

    def to_dict(self) -> dict[str, Any]:
        """For reports."""
        return {"profile": self.profile, "measured_ms": self.measured_ms, "profiled_ms": self.profiled_ms,
                "ratio": self.ratio, "tolerance": self.tolerance, "ok": self.ok, "attempts": list(self.attempts)}


def check_sentinel(profile: DeviceProfile, attempts: int = ATTEMPTS, measure: SentinelTimer | None = None) -> SentinelCheck:
    """Time the profile's sentinel here; a failing attempt is repeated, the attempt closest to the profile kept."""
    ref = float(profile.sentinel.get("latency_ms") or float("nan")) if isinstance(profile.sentinel, dict) else float("nan")
    if not (ref > 0):
        raise ValueError(f"profile {profile.name!r} has no sentinel latency to compare with (sentinel.latency_ms)")
    measure = measure or measure_sentinel
    tol, best, ratios = tolerance(profile), None, []
    for _ in range(max(attempts, 1)):
        check = SentinelCheck(profile.name, float(measure(profile)), ref, tol)
        ratios.append(round(check.ratio, 4))
        if best is None or abs(math.log(check.ratio)) < abs(math.log(best.ratio)):
            best = check
        if best.ok:
            break
    result = replace(best, attempts=tuple(ratios))
    log.info("%s", result.message())
    return result


def device_label(profile: DeviceProfile) -> str:
    """The profile's device in words: name, CPU, cores, threads, provider."""
    d = profile.device
    cpu = d.get("cpu_model", "?")
    if "cpu_family" in d:
        cpu += f" (family {d['cpu_family']} model {d.get('cpu_model_id', '?')})"
    return (f"{d.get('name', profile.name)!r} [{cpu}, {d.get('cores', '?')} cores, {d.get('threads', '?')} threads, "
            f"{d.get('provider', 'CPUExecutionProvider')}]")


def foreign_note(profile: DeviceProfile) -> str:
    """What export says instead of measuring against another device's profile."""
    return FOREIGN_NOTE.format(device=device_label(profile))


def foreign_profiles_note(profiles: Sequence[Any]) -> str | None:
    """The note for the first of `profiles` measured on another device, or None when all may be this machine's."""
    for profile in profiles:
        if compare_fingerprints(getattr(profile, "device", None) or {}).other:
            return foreign_note(profile)
    return None


def require_settings(profiles: Sequence[DeviceProfile], provider: str | None = None,
                     options: dict[str, str] | None = None) -> None:
    """ValueError unless every profile was measured with `provider` and `options` (when asked), all with one provider."""
    used = {p.name: p.device.get("provider", "CPUExecutionProvider") for p in profiles}
    for p in profiles if options else ():
        theirs = {str(k): str(v) for k, v in (p.device.get("provider_options") or {}).items()}
        if theirs != options:
            raise ValueError(f"asked for provider options {options}, but profile {p.name!r} was measured with {theirs}")
    if provider is not None:
        bad = {n: v for n, v in used.items() if v != provider}
        if bad:
            raise ValueError(f"asked for execution provider {provider!r}, but profile(s) "
                             f"{', '.join(f'{n!r} ({v})' for n, v in bad.items())} were measured with another; "
                             f"profile with `hwnas profile --provider {provider}`")
    if len(set(used.values())) > 1:
        raise ValueError(f"the profiles were measured with different execution providers: {used}")


def validate_here(profile: DeviceProfile, trust: bool = False,
                  check: Callable[[DeviceProfile], SentinelCheck] = check_sentinel) -> tuple[FingerprintMatch, SentinelCheck | None]:
    """The fingerprint verdict and, for this machine's profile (or one that cannot tell), the sentinel check.

    Raises ValueError when the sentinel is off. `trust` (the user's explicit override) skips the timing.
    Another device's profile is returned unchecked: its predictions are for that device.
    """
    match = profile.fingerprint_match()
    if match.other:
        log.info("profile %r is for another device (%s): predictions are for that device", profile.name, match.describe())
        return match, None
    if trust:
        log.warning("profile %r: sentinel not checked on this machine (%s)", profile.name, OVERRIDE_FLAG)
        return match, None
    result = check(profile)
    if not result.ok:
        raise ValueError(f"{result.message()}: this machine is not the one profiled; run `hwnas profile` here, "
                         f"or pass {OVERRIDE_FLAG} to use the profile anyway")
    return match, result


__all__ = ["FOREIGN_NOTE", "OVERRIDE_FLAG", "SentinelCheck", "check_sentinel", "compare_fingerprints", "device_label",
           "foreign_note", "foreign_profiles_note", "measure_sentinel", "profile_timing", "require_settings", "sentinel_arch", "tolerance",
           "validate_here", "validate_profiles"]


def validate_profiles(paths: Sequence[str], trust: bool = False, provider: str | None = None) -> list[DeviceProfile]:
    """Load the profiles at `paths`, require one provider (`provider` when asked), check each here (`validate_here`)."""
    profiles = [DeviceProfile.load(p) for p in paths]
    require_settings(profiles, provider)
    for profile in profiles:
        validate_here(profile, trust)
    return profiles
