"""Memory budgets: named device profiles and their enforcement at every block (docs/design.md §1, §7).

A budget is compared with MLX's allocator peak, measured after every block of every phase. A run that goes over stops
at once, as the OS stops an app that exceeds its limit, naming the phase and block; the last saved state (adapters,
optimizer, data position) stays on disk and `--resume` continues from it. MLX's memory limit is set from the budget
(a guideline, not a cap: the CPU allocator never checks it), on Metal the wired limit too, and its cache limit to a
fraction of it, so freed buffers
cannot pile up unseen (the growth users report while the peak stays flat).

Apple does not publish per-app memory limits (they depend on the device, and jetsam enforces them); the phone
budgets below are the papers' figures where they exist and otherwise a stated assumption. For an exact emulation of a
given phone, read its limit from a jetsam event report and pass `--budget-mb`.

A phone counts the whole process, not MLX's allocations alone: jetsam acts on the physical footprint (footprint.py).
The governor samples that footprint after every block too (each step's largest sample goes to metrics.jsonl) and,
under a footprint limit (`--footprint-limit`, or a phone profile's), stops the run the same way when it goes over.
A phone profile's footprint limit is its budget: the budget stands for what the OS lets the app hold, and the OS holds
the app to its footprint. The Mac profiles have none (macOS compresses and swaps rather than ending the process), nor
has paper-1gb (a class of the papers' MLX-side figures, not a device).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from .footprint import SOURCE, FootprintMeter, footprint_mb, release_free_heap

MB = 1024 * 1024


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    budget_mb: float
    provenance: str
    footprint_limit_mb: float | None = None  # the whole process's limit, as the OS enforces it (footprint.py)


_ASSUMED = "our assumption, not a measured limit (Apple publishes none): half the RAM for a foreground app"
PROFILES = {p.name: p for p in [
    DeviceProfile("paper-1gb", 1024, "MeBP (arXiv 2510.03425): 0.5B-4B models fine-tuned in < 1 GB on an iPhone 15 Pro "
                                     "Max; the papers' '< 1 GB' class"),
    DeviceProfile("iphone-15-pro-max", 1024, "8 GB RAM; budget = MeBP's < 1 GB fine-tuning on this phone", 1024),
    DeviceProfile("iphone-17-pro", 512, "MeSP (arXiv 2602.13069) Tables 1-3 on iPhone 17 Pro: peaks 110.7-513.6 MB at "
                                        "0.5B; budget = the largest reported (seq 1024) rounded to 512 MB", 512),
    DeviceProfile("phone-6gb-foreground", 3 * 1024, f"6 GB phone, app in the foreground; {_ASSUMED}", 3 * 1024),
    DeviceProfile("phone-6gb-background", 512, "6 GB phone, app in the background (BGProcessingTask); our "
                                                "assumption: background apps are jetsammed first, so a few hundred MB",
                  512),
    DeviceProfile("phone-8gb-foreground", 4 * 1024, f"8 GB phone, foreground; {_ASSUMED}", 4 * 1024),
    DeviceProfile("phone-8gb-background", 768, "8 GB phone, background; assumption as for 6 GB, scaled", 768),
    DeviceProfile("phone-12gb-foreground", 6 * 1024, f"12 GB phone, foreground; {_ASSUMED}", 6 * 1024),
    DeviceProfile("phone-12gb-background", 1024, "12 GB phone, background; assumption as for 6 GB, scaled", 1024),
    DeviceProfile("mac-8gb", 5 * 1024, "8 GB Mac laptop; assumption: about 2/3 of RAM for one training process"),
    DeviceProfile("mac-16gb", 10 * 1024, "16 GB Mac laptop; assumption: about 2/3 of RAM for one training process"),
]}


class BudgetError(ValueError):
    pass


class BudgetExceeded(MemoryError):
    def __init__(self, phase: str, block: int | None, peak_bytes: int, budget_mb: float):
        where = f"{phase} of block {block}" if block is not None else phase
        super().__init__(f"MLX peak {peak_bytes / MB:.1f} MB in the {where} exceeds the budget of {budget_mb:g} MB")
        self.phase, self.block, self.peak_mb = phase, block, peak_bytes / MB


class FootprintExceeded(BudgetExceeded):
    """The process footprint over its limit: stops the run as BudgetExceeded does (status over_budget, exit 4)."""

    def __init__(self, phase: str, block: int | None, footprint_mb: float, limit_mb: float):
        where = f"{phase} of block {block}" if block is not None else phase
        MemoryError.__init__(self, f"process footprint ({SOURCE}) {footprint_mb:.1f} MB after the {where} exceeds "
                                   f"the footprint limit of {limit_mb:g} MB")
        self.phase, self.block, self.peak_mb, self.limit_mb = phase, block, footprint_mb, limit_mb


def resolve_budget(profile: str | None, budget_mb: float | None) -> tuple[float | None, str]:
    """(budget in MB or None, description). --budget-mb wins over a profile's budget."""
    if profile is not None and profile not in PROFILES:
        raise BudgetError(f"unknown device profile {profile!r} (known: {', '.join(PROFILES)}; or give --budget-mb)")
    if budget_mb is not None:
        if budget_mb <= 0:
            raise BudgetError(f"--budget-mb must be positive, not {budget_mb}")
        return float(budget_mb), f"--budget-mb {budget_mb:g}"
    if profile is not None:
        return PROFILES[profile].budget_mb, f"profile {profile} ({PROFILES[profile].budget_mb:.0f} MB)"
    return None, "no budget"


def resolve_footprint_limit(profile: str | None, limit_mb: float | None) -> tuple[float | None, str]:
    """(footprint limit in MB or None, description). --footprint-limit wins over a profile's. Where the footprint
    cannot be read (footprint.py: neither Linux nor macOS) a given limit is refused and a profile's is not applied."""
    if profile is not None and profile not in PROFILES:
        raise BudgetError(f"unknown device profile {profile!r} (known: {', '.join(PROFILES)}; or give --budget-mb)")
    if limit_mb is not None:
        if limit_mb <= 0:
            raise BudgetError(f"--footprint-limit must be positive, not {limit_mb}")
        if SOURCE is None:
            raise BudgetError("--footprint-limit: this platform gives no process footprint to check it against "
                              "(Linux and macOS do)")
        return float(limit_mb), f"--footprint-limit {limit_mb:g}"
    if profile is not None and PROFILES[profile].footprint_limit_mb is not None and SOURCE is not None:
        return PROFILES[profile].footprint_limit_mb, f"profile {profile} ({PROFILES[profile].footprint_limit_mb:.0f} MB)"
    return None, "no footprint limit"


class Governor:
    """Sets MLX's limits from the budget and checks the peak after every block (the engine's on_block_done hook);
    samples the process footprint there too, and checks it against the footprint limit. Either may be None."""

    def __init__(self, budget_mb: float | None, cache_fraction: float = 0.1, footprint_limit_mb: float | None = None):
        self.budget_mb, self.footprint_limit_mb = budget_mb, footprint_limit_mb
        self.footprint = FootprintMeter()  # its windows are the loop's steps (run/loop.py)
        self._previous, self._wired = None, None
        if budget_mb is None:
            return
        self._previous = (mx.set_memory_limit(int(budget_mb * MB)),
                          mx.set_cache_limit(int(budget_mb * MB * cache_fraction)))
        if mx.metal.is_available():  # macOS 15+: keep the budget's pages wired, as a phone keeps an app's memory
            try:
                self._wired = mx.set_wired_limit(int(budget_mb * MB))
            except (RuntimeError, ValueError):  # older macOS, or a budget above the wired maximum
                self._wired = None

    def close(self) -> None:
        """Give MLX back the limits it had (they are process-wide)."""
        if self._previous is None:
            return
        mx.set_memory_limit(self._previous[0])
        mx.set_cache_limit(self._previous[1])
        if self._wired is not None:
            mx.set_wired_limit(self._wired)

    def __call__(self, phase: str, block: int | None, peak_bytes: int, active_bytes: int) -> None:
        if self.budget_mb is not None and peak_bytes / MB > self.budget_mb:
            raise BudgetExceeded(phase, block, peak_bytes, self.budget_mb)
        footprint = footprint_mb()
        if self.footprint_limit_mb is not None and footprint is not None and footprint > self.footprint_limit_mb:
            release_free_heap()  # free pages the C heap kept are not the run's (footprint.py); then measure again
            footprint = footprint_mb()
        self.footprint.record(footprint)
        if self.footprint_limit_mb is not None and footprint is not None and footprint > self.footprint_limit_mb:
            raise FootprintExceeded(phase, block, footprint, self.footprint_limit_mb)


def profile_lines() -> list[str]:
    width = max(len(n) for n in PROFILES)
    return [f"{p.name:<{width}}  {p.budget_mb:>6.0f} MB  footprint "
            f"{f'{p.footprint_limit_mb:.0f} MB' if p.footprint_limit_mb else 'none':>7}  {p.provenance}"
            for p in PROFILES.values()]
