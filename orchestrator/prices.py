"""The prices file (`ORCH_PRICES_FILE`): read, every price checked, and what no engine reads told."""

from __future__ import annotations

import difflib
import importlib
import math
import tomllib
from collections.abc import Iterator
from typing import Any

from orchestrator.errors import InvalidRequest
from orchestrator.schemas import MAX_CREDITS
from orchestrator.settings import Settings
from tiers.base import whole_thousandths
from tiers.registry import PRICELESS, known_names


def load_price_overrides(settings: Settings) -> dict[str, Any]:
    """`{engine: {model: {variant: credits}}}` from `ORCH_PRICES_FILE`. Every price is checked: a
    negative, non-finite, huge or sub-millicredit price would make a paid engine free (or a
    source of credit), or fail every job that reaches it."""
    if settings.prices_file is None:
        return {}
    try:
        # Past a byte-order mark (as Windows editors write), as the policy files are read.
        overrides = tomllib.loads(settings.prices_file.read_bytes().decode("utf-8-sig"))
    except IsADirectoryError:
        raise InvalidRequest(f"prices file {settings.prices_file}: is a directory, not a TOML file") from None
    except FileNotFoundError:
        raise InvalidRequest(f"prices file {settings.prices_file}: no such file") from None
    except OSError as exc:  # a permission, the disk: said as the config file's are, without Python's [Errno n]
        raise InvalidRequest(f"prices file {settings.prices_file}: cannot read it ({exc.strerror or exc})") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidRequest(f"prices file {settings.prices_file}: {exc}") from exc
    except RecursionError:  # arrays nested some hundreds deep: tomllib recurses (as the policy loader says)
        raise InvalidRequest(f"prices file {settings.prices_file}: nested too deeply to read") from None
    problems = [f"{settings.prices_file}: {problem}" for problem in _price_problems(overrides)]
    known = known_names(settings.extra_engines)
    for engine in sorted(set(overrides) - known):
        # A misspelt engine left its default prices in force, without a word.
        close = difflib.get_close_matches(engine, known, n=1)
        problems.append(f"{settings.prices_file}: '{engine}' is not an engine"
                        + (f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"))
    for engine in sorted(set(overrides) & PRICELESS):
        # Read by nobody: a studio metering its own GPUs this way would see them free, untold.
        problems.append(f"{settings.prices_file}: '{engine}' takes no prices from this file "
                        + ("(local work is priced by ORCH_LOCAL_GPU_SECOND_CREDITS)"
                           if engine in ("lite", "local-hifi") else "(a self-hosted server costs 0 credits)"))
    if problems:
        raise InvalidRequest("; ".join(problems))
    return overrides


# The built-in paid engines: the module holding each one's price table, and the setting naming its model.
PRICED_ENGINES = {"gemini": ("tiers.gemini", "gemini_model"), "openai": ("tiers.openai_images", "openai_model"),
                  "stability": ("tiers.stability", "stability_model"),
                  "replicate": ("tiers.replicate", "replicate_model"), "fal": ("tiers.fal", "fal_model")}


def unread_prices(settings: Settings, overrides: dict[str, Any]) -> list[str]:
    """Prices file entries no engine reads: a model its engine neither prices by default nor is
    set to use, a price key none of its models has (`"1k"` for `"1K"`). Told, not refused: a
    studio may price a model before it switches to it, and a plugin's keys are its own."""
    told = []
    for engine, models in overrides.items():
        if engine not in PRICED_ENGINES or not isinstance(models, dict):
            continue
        module_name, setting = PRICED_ENGINES[engine]
        module = importlib.import_module(module_name)
        defaults: dict[str, dict[str, float]] = module.DEFAULT_PRICES
        configured = str(getattr(settings, setting) or "")
        configured = configured.strip("/") if engine == "fal" else configured  # as `tiers.fal` reads it
        keys = set().union(*defaults.values(), getattr(module, "OPTIONAL_PRICES", ()))  # as `PriceTable` reads
        for model, variants in models.items():
            if model not in defaults and model != configured:
                told.append(f'{engine}."{model}" is neither a model {engine} has prices for nor the one '
                            f"ORCH_{setting.upper()} names ({configured}){_suggest(model, [*defaults, configured])}: "
                            "its prices are read by nobody for now")
            for variant in variants if isinstance(variants, dict) else ():
                if variant not in keys:
                    told.append(f'{engine}."{model}"."{variant}" is not a price {engine} reads'
                                f"{_suggest(variant, sorted(keys))} (it reads: {', '.join(sorted(keys))})")
    return told


def _suggest(word: str, options: list[str]) -> str:
    same = [option for option in options if option.casefold() == word.casefold()]
    close = same or difflib.get_close_matches(word, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _price_problems(overrides: dict[str, Any]) -> Iterator[str]:
    for engine, models in overrides.items():
        if not isinstance(models, dict):
            yield f"'{engine}' must be a table of models ([{engine}.\"<model>\"])"
            continue
        for model, variants in models.items():
            if not isinstance(variants, dict):
                yield f"{engine}.{model} must be a table of prices (\"<variant>\" = credits)"
                continue
            for variant, price in variants.items():
                where = f"{engine}.{model}.{variant}"
                if isinstance(price, bool) or not isinstance(price, int | float):
                    yield f"{where} must be a number of credits (got {price!r})"
                elif not math.isfinite(price) or not 0 <= price <= MAX_CREDITS:
                    yield f"{where} must be between 0 and {MAX_CREDITS} credits (got {price!r})"
                elif not whole_thousandths(price):
                    yield f"{where} must be a whole number of thousandths of a credit (got {price!r})"
