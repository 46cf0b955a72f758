"""The bot's settings: a TOML file plus the environment, validated once at start-up.

``load_settings(path)`` reads the file; ``parse_settings(mapping)`` checks an already parsed
document (tests use it directly). Every problem is reported as a :class:`SettingsError` whose
message is one sentence saying what to fix, naming the section and key. The bot token lives in a
:class:`Secret`, whose ``repr`` and ``str`` hide it.
"""

from __future__ import annotations

import difflib
import hmac
import os
import re
import tomllib
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast, get_args

TOKEN_ENVIRONMENT_VARIABLE: Final = "TELEGRAM_BOT_TOKEN"  # noqa: S105 - a name, not a secret
MAX_TOP_N: Final = 10  # an album holds at most 10 photos
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")

AddPolicy = Literal["everyone", "chat_admins", "admins"]
ADD_POLICIES: Final[tuple[str, ...]] = get_args(AddPolicy)

# What @BotFather issues: the bot's numeric id, a colon, then a long URL-safe secret.
_TOKEN_SHAPE = re.compile(r"^\d{1,20}:[A-Za-z0-9_-]{20,}$")

T = TypeVar("T")


class SettingsError(Exception):
    """The configuration cannot be used; the message says what to fix."""


class Secret:
    """A string that stays out of logs, reprs and tracebacks; read it with :meth:`reveal`."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: pass it straight to the library that needs it."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class TelegramSettings:
    token: Secret
    api_base_url: str | None  # a self-hosted Bot API server; None: api.telegram.org
    api_file_url: str | None


@dataclass(frozen=True, slots=True)
class IndexSettings:
    dir: Path
    workers: int  # processes for feature extraction and matching


@dataclass(frozen=True, slots=True)
class SearchSettings:
    top_n: int
    min_score: float  # unverified results need at least this score to be shown


@dataclass(frozen=True, slots=True)
class AccessSettings:
    admins: frozenset[int]
    add_policy: AddPolicy
    allowed_chats: frozenset[int]  # empty: every chat
    queries_per_minute: int  # per user; 0: unlimited


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    concurrent_updates: int
    notify_admins_on_error: bool
    log_level: str


@dataclass(frozen=True, slots=True)
class WatchSettings:
    queue_size: int  # watched photos queued in memory; more wait in the catalog's inbox
    album_wait_s: float  # quiet time after an album's last item before it is answered


@dataclass(frozen=True, slots=True)
class BotSettings:
    """Everything the bot is configured with, validated."""

    telegram: TelegramSettings
    index: IndexSettings
    search: SearchSettings
    access: AccessSettings
    runtime: RuntimeSettings
    watch: WatchSettings


def load_settings(path: Path, environ: Mapping[str, str] | None = None) -> BotSettings:
    """Read and validate the TOML file at ``path``; relative paths in it are relative to it.

    ``environ`` (default: ``os.environ``) may hold TELEGRAM_BOT_TOKEN, which overrides the
    file's token.

    Raises:
        SettingsError: the file is missing, unreadable, not TOML, or holds a wrong value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SettingsError(
            f"The config file {path} does not exist: copy config.example.toml there and edit it."
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise SettingsError(f"The config file {path} cannot be read: {error}.") from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"The config file {path} is not valid TOML: {error}.") from None
    return parse_settings(
        document, environ=os.environ if environ is None else environ, base_dir=path.parent
    )


def parse_settings(
    document: Mapping[str, Any], *, environ: Mapping[str, str], base_dir: Path
) -> BotSettings:
    """Validate a parsed configuration document.

    Raises:
        SettingsError: a section or key is unknown, or a value is missing or wrong.
    """
    _reject_unknown("", document, _SECTIONS)
    sections = {name: _section(document, name) for name in _SECTIONS}
    return BotSettings(
        telegram=_telegram(sections["telegram"], environ),
        index=_index(sections["index"], base_dir),
        search=_search(sections["search"]),
        access=_access(sections["access"]),
        runtime=_runtime(sections["runtime"]),
        watch=_watch(sections["watch"]),
    )


# -- sections ----------------------------------------------------------------------------------

_SECTIONS: Final = {
    "telegram": ("token", "api_base_url", "api_file_url"),
    "index": ("dir", "workers"),
    "search": ("top_n", "min_score"),
    "access": ("admins", "add_policy", "allowed_chats", "queries_per_minute"),
    "runtime": ("concurrent_updates", "notify_admins_on_error", "log_level"),
    "watch": ("queue_size", "album_wait_s"),
}


def _telegram(section: Mapping[str, Any], environ: Mapping[str, str]) -> TelegramSettings:
    token = environ.get(TOKEN_ENVIRONMENT_VARIABLE, "").strip()
    where = f"the {TOKEN_ENVIRONMENT_VARIABLE} environment variable"
    if not token:
        token = _read(section, "telegram", "token", "", _string).strip()
        where = "[telegram] token"
    if not token:
        raise SettingsError(
            f"No bot token: set the {TOKEN_ENVIRONMENT_VARIABLE} environment variable or "
            "[telegram] token (ask @BotFather for one)."
        )
    if not _TOKEN_SHAPE.match(token):
        # Never echo the value: a mistyped token is still mostly a secret.
        raise SettingsError(
            f"The bot token in {where} does not look like one from @BotFather "
            "(digits, a colon, then a long code); copy it again."
        )
    base_url = _optional_url(section, "api_base_url")
    file_url = _optional_url(section, "api_file_url")
    if (base_url is None) != (file_url is None):
        raise SettingsError(
            "[telegram] api_base_url and api_file_url go together: set both (for a "
            "self-hosted Bot API server) or neither (for api.telegram.org)."
        )
    return TelegramSettings(token=Secret(token), api_base_url=base_url, api_file_url=file_url)


def _index(section: Mapping[str, Any], base_dir: Path) -> IndexSettings:
    raw_dir = _read(section, "index", "dir", "data/index", _string)
    if not raw_dir.strip():
        raise SettingsError('[index] dir must name a folder, for example "data/index".')
    folder = Path(raw_dir).expanduser()
    if not folder.is_absolute():
        folder = base_dir / folder
    if folder.exists() and not folder.is_dir():
        raise SettingsError(f"[index] dir is {folder}, which is a file, not a folder.")
    workers = _read(section, "index", "workers", 0, _whole(0, 256))
    # One core is left to the event loop (downloads, replies, the engine's light steps).
    return IndexSettings(dir=folder, workers=workers or max(1, (os.cpu_count() or 1) - 1))


def _search(section: Mapping[str, Any]) -> SearchSettings:
    return SearchSettings(
        top_n=_read(section, "search", "top_n", 5, _whole(1, MAX_TOP_N)),
        min_score=_read(section, "search", "min_score", 0.15, _fraction),
    )


def _access(section: Mapping[str, Any]) -> AccessSettings:
    policy = _read(section, "access", "add_policy", "everyone", _string)
    if policy not in ADD_POLICIES:
        raise SettingsError(
            f"[access] add_policy must be one of {', '.join(map(repr, ADD_POLICIES))}, "
            f"not {policy!r}."
        )
    return AccessSettings(
        admins=_read(section, "access", "admins", frozenset(), _user_ids),
        add_policy=cast(AddPolicy, policy),
        allowed_chats=_read(section, "access", "allowed_chats", frozenset(), _chat_ids),
        queries_per_minute=_read(section, "access", "queries_per_minute", 10, _whole(0, 10_000)),
    )


def _runtime(section: Mapping[str, Any]) -> RuntimeSettings:
    level = _read(section, "runtime", "log_level", "INFO", _string).upper()
    if level not in LOG_LEVELS:
        raise SettingsError(f"[runtime] log_level must be one of {', '.join(LOG_LEVELS)}.")
    return RuntimeSettings(
        concurrent_updates=_read(section, "runtime", "concurrent_updates", 8, _whole(1, 256)),
        notify_admins_on_error=_read(section, "runtime", "notify_admins_on_error", True, _boolean),
        log_level=level,
    )


def _watch(section: Mapping[str, Any]) -> WatchSettings:
    wait = _read(section, "watch", "album_wait_s", 1.0, _number(0.0, 60.0))
    return WatchSettings(
        queue_size=_read(section, "watch", "queue_size", 100, _whole(2, 100_000)),
        album_wait_s=wait,
    )


# -- value checks: each returns the value or an error phrase ("must be ...") --------------------


def _read(
    section: Mapping[str, Any],
    section_name: str,
    key: str,
    default: T,
    check: Callable[[Any], tuple[T | None, str | None]],
) -> T:
    if key not in section:
        return default
    value, problem = check(section[key])
    if problem is not None:
        raise SettingsError(f"[{section_name}] {key} {problem}, not {section[key]!r}.")
    return cast(T, value)


def _string(value: Any) -> tuple[str | None, str | None]:
    return (value, None) if isinstance(value, str) else (None, "must be a quoted string")


def _boolean(value: Any) -> tuple[bool | None, str | None]:
    return (value, None) if isinstance(value, bool) else (None, "must be true or false")


def _whole(minimum: int, maximum: int) -> Callable[[Any], tuple[int | None, str | None]]:
    def check(value: Any) -> tuple[int | None, str | None]:
        if isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= maximum:
            return value, None
        return None, f"must be a whole number from {minimum} to {maximum}"

    return check


def _number(minimum: float, maximum: float) -> Callable[[Any], tuple[float | None, str | None]]:
    def check(value: Any) -> tuple[float | None, str | None]:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if number and minimum <= value <= maximum:
            return float(value), None
        return None, f"must be a number from {minimum:g} to {maximum:g}"

    return check


def _fraction(value: Any) -> tuple[float | None, str | None]:
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value), None
    return None, "must be a number from 0 to 1"


def _ids(value: Any, *, positive: bool) -> tuple[frozenset[int] | None, str | None]:
    kind = "user ids (positive whole numbers)" if positive else "chat ids (whole numbers)"
    if not isinstance(value, list):
        return None, f"must be a list of {kind}, like [123456789]"
    for item in value:
        if not isinstance(item, int) or isinstance(item, bool) or (positive and item <= 0):
            return None, f"must be a list of {kind}, like [123456789]"
    return frozenset(value), None


def _user_ids(value: Any) -> tuple[frozenset[int] | None, str | None]:
    return _ids(value, positive=True)


def _chat_ids(value: Any) -> tuple[frozenset[int] | None, str | None]:
    return _ids(value, positive=False)


def _optional_url(section: Mapping[str, Any], key: str) -> str | None:
    url = _read(section, "telegram", key, "", _string).strip()
    if not url:
        return None
    if not url.startswith(("http://", "https://")):
        raise SettingsError(f"[telegram] {key} must start with http:// or https://, not {url!r}.")
    return url


# -- structure ------------------------------------------------------------------------------------


def _section(document: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = document.get(name, {})
    if not isinstance(section, dict):
        raise SettingsError(f"[{name}] must be a table (a [{name}] header followed by keys).")
    _reject_unknown(name, section, _SECTIONS[name])
    return cast(Mapping[str, Any], section)


def _reject_unknown(section_name: str, found: Mapping[str, Any], known: Collection[str]) -> None:
    for key in found:
        if key in known:
            continue
        close = difflib.get_close_matches(key, list(known), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}."
        if section_name:
            raise SettingsError(f"[{section_name}] has no key {key!r}{hint}")
        raise SettingsError(f"There is no section [{key}]{hint}")
