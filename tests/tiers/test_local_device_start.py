"""Which local engine classes tell their work's start on the device (`tells_device_start`)."""

from __future__ import annotations

from typing import Any, ClassVar

from tiers._local import LocalEngine
from tiers.base import CancelToken, Progress, RenderRequest, RenderResult
from tiers.lite import LiteEngine
from tiers.local_hifi import LocalHifiEngine


class Logged:
    """A mixin that adds a method of its own and changes none of the engine's work."""

    def logged(self) -> str:
        return "logged"


class OwnGenerate:
    """A mixin whose `_generate` never calls `Progress.on_device`."""

    def _generate(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
        raise NotImplementedError


def test_a_subclass_that_keeps_the_telling_code_keeps_telling_and_one_that_overrides_it_does_not() -> None:
    """A subclass of `lite` (or one mixing it in) that left its work as it was read
    `tells_device_start` False: `LocalEngine.__init_subclass__` reset it on every class that did not
    say it, so a failed attempt counted its model's load. Now a class inherits it where the methods
    that tell it (`device_start_told_by`) are the ones of the class that said it; one that overrides
    any of them tells only where it says so itself."""

    class Renamed(LiteEngine):
        name = "renamed-lite"

    class Mixed(Logged, LiteEngine):
        pass

    class Deeper(Renamed):
        pass

    class Hifi(LocalHifiEngine):
        name = "other-hifi"

    for kept in (Renamed, Mixed, Deeper, Hifi):
        assert kept.tells_device_start, kept

    class Generates(LiteEngine):
        def _generate(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    class Runs(LiteEngine):
        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    class MixedIn(OwnGenerate, LiteEngine):
        pass

    class Renders(LocalHifiEngine):
        def _render(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    class UnderGenerates(Generates):
        pass

    for overridden in (Generates, Runs, MixedIn, Renders, UnderGenerates):
        assert not overridden.tells_device_start, overridden

    class Says(LiteEngine):
        tells_device_start: ClassVar[bool] = True

        def _generate(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            progress.on_device()
            raise NotImplementedError

    class UnderSays(Says):
        pass

    assert Says.tells_device_start and UnderSays.tells_device_start


def test_a_plugin_s_local_engine_tells_only_where_its_own_class_says_so() -> None:
    """`LocalEngine` does not tell, and a subclass of a plugin's class that says it keeps it as long
    as its `run` (what a class that does not name its telling methods tells from) is the same."""

    class Plugin(LocalEngine):
        async def run(self, *args: Any) -> Any:
            raise NotImplementedError

    class Telling(LocalEngine):
        tells_device_start: ClassVar[bool] = True

        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            progress.on_device()
            raise NotImplementedError

    class KeepsRun(Telling):
        pass

    class OwnRun(Telling):
        async def run(self, *args: Any) -> Any:
            raise NotImplementedError

    assert not LocalEngine.tells_device_start and not Plugin.tells_device_start
    assert Telling.tells_device_start and KeepsRun.tells_device_start and not OwnRun.tells_device_start


class SaysWithoutTheCode:
    """A mixin that says its engine tells, naming a method it lacks (a typo, or code its engines
    were meant to bring): it has no code that tells."""

    tells_device_start: ClassVar[bool] = True
    device_start_told_by: ClassVar[tuple[str, ...]] = ("_work",)


def test_a_class_inherits_telling_only_from_a_class_that_has_the_methods_it_names() -> None:
    """A mixin saying `tells_device_start = True` whose `device_start_told_by` names methods it
    lacks passed it on to every engine that mixed it in: the names were compared as absent on both
    classes, so a `lite` whose own `run` never calls `Progress.on_device` read True, and counted
    each failed attempt 0 s. So did a class with a misspelt name, to a subclass that overrides the
    method that does tell, and one that names none (`()`), which README reads as `run`, to any."""

    class OwnRun(SaysWithoutTheCode, LiteEngine):
        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    class Plain(SaysWithoutTheCode, LocalEngine):
        async def run(self, *args: Any) -> Any:
            raise NotImplementedError

    class Misspelt(LocalEngine):
        tells_device_start: ClassVar[bool] = True
        device_start_told_by: ClassVar[tuple[str, ...]] = ("run", "_infer")

        async def run(self, *args: Any) -> Any:
            raise NotImplementedError

        def _inference(self) -> None:
            raise NotImplementedError

    class OwnInference(Misspelt):
        def _inference(self) -> None:
            raise NotImplementedError

    class NamesNone(LocalEngine):
        tells_device_start: ClassVar[bool] = True
        device_start_told_by: ClassVar[tuple[str, ...]] = ()

        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            progress.on_device()
            raise NotImplementedError

    class RunsOnItsOwn(NamesNone):
        async def run(self, *args: Any) -> Any:
            raise NotImplementedError

    class KeepsRun(NamesNone):
        pass

    for inherited in (OwnRun, Plain, OwnInference, RunsOnItsOwn):
        assert not inherited.tells_device_start, inherited
    # What says it itself, and what keeps every method its sayer names, still tell.
    assert Misspelt.tells_device_start and NamesNone.tells_device_start and KeepsRun.tells_device_start


def test_a_class_that_names_no_telling_method_passes_it_on_only_where_its_run_tells() -> None:
    """A plugin's class that says `tells_device_start = True` and names no telling methods is read
    as told by `run`; where its `run` hands the telling to a helper, a subclass overriding only that
    helper (whose work never calls `Progress.on_device`) kept the `run` and read True, so each of
    its failed attempts counted 0 device-seconds whatever it held. Now such a class passes it on
    only where its `run`'s own code tells (a function nested in it, or one it wraps, included)."""

    class HandsItOn(LocalEngine):
        tells_device_start: ClassVar[bool] = True

        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            return self._infer(req, progress, cancel)

        def _infer(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            progress.on_device()
            raise NotImplementedError

    class OwnInfer(HandsItOn):
        def _infer(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    class Renamed(HandsItOn):
        pass

    class TellsInRun(LocalEngine):
        tells_device_start: ClassVar[bool] = True

        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            def work() -> RenderResult:
                progress.on_device()
                raise NotImplementedError
            return work()

    class KeepsTellingRun(TellsInRun):
        def logged(self) -> str:
            return "logged"

    class NamesItsHelper(HandsItOn):
        tells_device_start: ClassVar[bool] = True
        device_start_told_by: ClassVar[tuple[str, ...]] = ("run", "_infer")

    class KeepsNamedHelper(NamesItsHelper):
        pass

    class OwnNamedHelper(NamesItsHelper):
        def _infer(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    # Saying it itself is taken as said; what a subclass inherits is judged by the code it keeps.
    assert HandsItOn.tells_device_start and TellsInRun.tells_device_start and NamesItsHelper.tells_device_start
    assert not OwnInfer.tells_device_start and not Renamed.tells_device_start
    assert KeepsTellingRun.tells_device_start
    assert KeepsNamedHelper.tells_device_start and not OwnNamedHelper.tells_device_start


def test_a_mixin_that_is_a_local_engine_itself_leaves_lite_telling() -> None:
    """A mixin written as a `LocalEngine` subclass (for its typing, or a helper of its own) that
    says nothing of telling, mixed before `lite`, took `lite`'s telling away: reading `run` as its
    telling method, it found no `run` of its own calling `on_device` and set False on itself, and a
    class mixing it before `lite` inherited that False, so its failed attempts (and its running
    ones, read while they ran) counted its model's load. A class that never said it passes nothing
    on; `lite`, mixed with it, tells as it did."""

    class Helpers(LocalEngine):
        def logged(self) -> str:
            return "logged"

    class MixedLite(Helpers, LiteEngine):
        name = "mixed-lite"

    class MixedHifi(Helpers, LocalHifiEngine):
        name = "mixed-hifi"

    assert not Helpers.tells_device_start
    assert MixedLite.tells_device_start and MixedHifi.tells_device_start
    # What overrides a telling method through such a mixin still does not tell.

    class OwnGenerateHelpers(LocalEngine):
        def _generate(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    class OverLite(OwnGenerateHelpers, LiteEngine):
        name = "over-lite"

    assert not OverLite.tells_device_start


class _LazyProxy:
    """A stand-in that forwards every attribute to an object bound later (as lazy proxies do),
    raising outside the context that binds it."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"{name}: read outside the context that binds this proxy")

    def __call__(self, *args: Any) -> Any:
        raise NotImplementedError


def test_reading_whether_run_tells_never_fails_a_class_s_creation() -> None:
    """Whether a class's `run` calls `on_device` is read from its code as the class is made; a
    `run` whose attribute lookups raise other than AttributeError (a lazy proxy read outside its
    context) failed the class's creation with that error. Such a `run` is read as not telling."""

    class Proxied(LocalEngine):
        tells_device_start: ClassVar[bool] = True
        run = _LazyProxy()

    class UnderProxied(Proxied):
        pass

    assert Proxied.tells_device_start and not UnderProxied.tells_device_start


def test_a_lite_subclass_whose_own_run_hands_the_telling_to_a_helper_passes_it_on_only_where_run_tells() -> None:
    """A subclass of `lite` that replaces its `run` with one handing the work to a helper of its
    own that tells, and says `tells_device_start = True` again as it must, kept `lite`'s names
    (`run`, `_on_device`, `_generate`): a subclass of it overriding only that helper, whose work
    never calls `Progress.on_device`, kept all three and read True, so its failed attempts counted
    0 device-seconds. `lite`'s names describe `lite`'s `run`, not one that replaced it: such a
    class passes it on only where its own `run`'s code tells, as a class naming none."""

    class OwnRun(LiteEngine):
        tells_device_start: ClassVar[bool] = True

        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            return await self._on_device(self._infer, req, progress, cancel)

        def _infer(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            progress.on_device()
            raise NotImplementedError

    class OwnInfer(OwnRun):
        def _infer(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            raise NotImplementedError

    class TellingRun(LiteEngine):
        tells_device_start: ClassVar[bool] = True

        async def run(self, req: RenderRequest, progress: Progress, cancel: CancelToken) -> RenderResult:
            progress.on_device()
            raise NotImplementedError

    class KeepsTellingRun(TellingRun):
        pass

    assert OwnRun.tells_device_start and not OwnInfer.tells_device_start
    assert KeepsTellingRun.tells_device_start
