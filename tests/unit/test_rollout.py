"""rollout.toml, a device's wave, and maintenance windows: pure logic on given times."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from keystone.config import parse_config
from keystone.errors import LimitExceeded, ValidationError
from keystone.limits import Limits
from keystone.recipe import parse_recipe
from keystone.rollout import assign, parse_rollout, wave_of, wave_point
from keystone.sync.rollout import decide, parse_defer_answer
from keystone.windows import Maintenance, next_open, parse_window

REV_A = "a" * 40
REV_B = "b" * 40
SPEC = """\
waves = ["1%", "10%", "50%", "100%"]
wait = "1h"
canary_labels = ["canary"]

[labels.lab]
waves = ["50%", "100%"]
wait = "10m"

[labels.frozen]
halted = true
"""


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class TestSpec:
    def test_top_level_and_label_settings(self) -> None:
        spec = parse_rollout(SPEC)
        assert spec.default.waves == (0.01, 0.1, 0.5, 1.0)
        assert spec.default.waits == (3600.0,) * 3
        assert spec.labels["lab"].waves == (0.5, 1.0) and spec.labels["lab"].waits == (600.0,)
        # A label inherits what it does not set.
        frozen = spec.labels["frozen"]
        assert frozen.halted and frozen.waves == spec.default.waves
        assert frozen.canary_labels == ("canary",)
        assert spec.policy_for(["x", "lab", "frozen"])[1] == "lab"
        assert spec.policy_for(["x"])[1] is None

    def test_fractions_as_numbers_and_a_wait_per_gap(self) -> None:
        spec = parse_rollout('waves = [0.05, 0.5, 1]\nwait = ["30m", "2h"]\n')
        assert spec.default.waves == (0.05, 0.5, 1.0)
        assert spec.default.offsets() == (0.0, 1800.0, 9000.0)

    @pytest.mark.parametrize(
        ("text", "line", "field", "words"),
        [
            ('waves = ["1%", "100"]\nwait = "1h"\n', 1, "waves[1]", "percentage"),
            ('waves = ["10%", "5%", "100%"]\nwait = "1h"\n', 1, "waves[1]", "must grow"),
            ('waves = ["50%", "10%", "100%"]\nwait = "1h"\n', 1, "waves[1]", "'10%' after '50%'"),
            ('waves = ["10%", "100%"]\nwait = ["1h", "2h"]\n', 2, "wait", "expected 1 duration ("),
            ('waves = ["10%", "50%"]\nwait = "1h"\n', 1, "waves[1]", '"100%"'),
            ('waves = ["0%", "100%"]\nwait = "1h"\n', 1, "waves[0]", "above 0%"),
            ('waves = [10, "100%"]\nwait = "1h"\n', 1, "waves[0]", '"10%"'),
            ('waves = ["1%", "100%"]\n', 1, "waves", "need a wait"),
            ('waves = ["1%", "5%", "100%"]\n\nwait = ["1h"]\n', 3, "wait", "expected 2 durations"),
            ('waves = ["1%", "100%"]\nwait = "soon"\n', 2, "wait", "duration"),
            ('halted = "yes"\n', 1, "halted", "true or false"),
            ('canary_labels = ["a/b"]\n', 1, "canary_labels[0]", "label"),
            ('[maintenance]\nwindows = ["25:00-01:00"]\n', 2, "maintenance.windows[0]", "time"),
            (
                '[maintenance]\ntimezone = "Mars/Olympus"\nwindows = ["02:00-03:00"]\n',
                2,
                "maintenance.timezone",
                "unknown time zone",
            ),
            ("[labels.lab]\nwaves = [0.5, 2]\n", 2, "labels.lab.waves[1]", '"2%"'),
        ],
    )
    def test_errors_name_file_line_and_field(
        self, text: str, line: int, field: str, words: str
    ) -> None:
        with pytest.raises(ValidationError) as err:
            parse_rollout(text, file="rollout.toml@abc")
        e = err.value
        assert (e.file, e.line, e.field) == ("rollout.toml@abc", line, field), str(e)
        assert words in str(e)
        assert str(e).startswith(f"rollout.toml@abc:{line}: {field}")

    def test_an_unknown_key_is_an_error_not_ignored(self) -> None:
        """A misspelt ``halted`` must never be ignored: the halt would not happen."""
        with pytest.raises(ValidationError, match=r"rollout.toml:2: unknown field halt\b"):
            parse_rollout('waves = ["100%"]\nhalt = true\n')
        with pytest.raises(ValidationError, match=r"rollout.toml:2: unknown field labels.x.wave"):
            parse_rollout('[labels.x]\nwave = ["100%"]\n')

    def test_malformed_toml_and_limits_as_plans(self) -> None:
        with pytest.raises(ValidationError, match=r"rollout.toml:2: .*malformed TOML"):
            parse_rollout('waves = ["100%"]\nwait = \n')
        with pytest.raises(LimitExceeded, match="max_plan_bytes"):
            parse_rollout("# " + "x" * 2000 + "\n", limits=Limits(max_plan_bytes=1000))


class TestWaves:
    def test_each_device_lands_in_one_wave_deterministically(self) -> None:
        spec = parse_rollout(SPEC)
        ids = [f"dev-{i:04d}" for i in range(400)]

        def waves(rev: str) -> list[int]:
            return [
                assign(spec, device_id=d, labels=[], revision=rev, commit_time=0).wave for d in ids
            ]

        first = waves(REV_A)
        assert first == waves(REV_A)  # stable: the same answer every time, on every device
        assert set(first) == {1, 2, 3, 4}
        # A new revision picks other canaries.
        again = waves(REV_B)
        assert [i for i, w in enumerate(first) if w == 1] != [
            i for i, w in enumerate(again) if w == 1
        ]

    def test_known_points_and_their_waves(self) -> None:
        """Pinned values: the hash is part of the contract (every device computes the same)."""
        assert wave_point("dev-1", REV_A) == pytest.approx(
            int.from_bytes(__import__("hashlib").sha256(f"dev-1\n{REV_A}".encode()).digest()[:8])
            / 2**64
        )
        assert wave_of(0.0, (0.01, 1.0)) == 1
        assert wave_of(0.01, (0.01, 1.0)) == 2  # the fraction is an upper bound, excluded
        assert wave_of(0.999, (0.01, 0.1, 1.0)) == 3

    def test_wave_times_count_from_the_commit(self) -> None:
        spec = parse_rollout(SPEC)
        by_wave = {}
        for i in range(2000):
            a = assign(spec, device_id=f"d{i}", labels=[], revision=REV_A, commit_time=1000.0)
            by_wave[a.wave] = a
        assert {w: a.at for w, a in by_wave.items()} == {
            1: 1000.0,
            2: 4600.0,
            3: 8200.0,
            4: 11800.0,
        }
        assert by_wave[1].canary and not by_wave[2].canary

    def test_a_canary_label_pins_wave_one(self) -> None:
        spec = parse_rollout(SPEC)
        for i in range(50):
            a = assign(spec, device_id=f"d{i}", labels=["canary"], revision=REV_A, commit_time=0)
            assert a.wave == 1 and a.pinned and a.canary and a.at == 0

    def test_a_label_rolls_out_on_its_own_waves(self) -> None:
        spec = parse_rollout(SPEC)
        got = {
            assign(spec, device_id=f"d{i}", labels=["lab"], revision=REV_A, commit_time=0).at
            for i in range(200)
        }
        assert got == {0.0, 600.0}


class TestDecide:
    spec = parse_rollout('waves = ["50%", "100%"]\nwait = "1h"\n')

    def second_wave_device(self) -> str:
        for i in range(100):
            if (
                assign(self.spec, device_id=f"d{i}", labels=[], revision=REV_A, commit_time=0).wave
                == 2
            ):
                return f"d{i}"
        raise AssertionError("no device in wave 2")

    def test_waits_until_exactly_its_wave(self) -> None:
        dev = self.second_wave_device()
        kw = {"device_id": dev, "labels": [], "revision": REV_A, "commit_time": 1000.0}
        _, hold = decide(self.spec, now=4599.0, agent_windows=None, **kw)  # type: ignore[arg-type]
        assert hold is not None and hold.reason == "wave" and hold.at == 4600.0
        assert hold.message == "waiting for wave 2 at 1970-01-01T01:16:40Z"
        _, hold = decide(self.spec, now=4600.0, agent_windows=None, **kw)  # type: ignore[arg-type]
        assert hold is None

    def test_halted_holds_every_wave(self) -> None:
        spec = parse_rollout('waves = ["50%", "100%"]\nwait = "1h"\nhalted = true\n')
        for i in range(20):
            _, hold = decide(
                spec,
                device_id=f"d{i}",
                labels=[],
                revision=REV_A,
                commit_time=0,
                now=1e9,
                agent_windows=None,
            )
            assert hold is not None and hold.reason == "halted" and hold.at is None
            assert hold.message == "rollout halted"

    def test_no_spec_and_no_window_holds_nothing(self) -> None:
        assert decide(
            None, device_id="d", labels=[], revision=REV_A, commit_time=0, now=0, agent_windows=None
        ) == (None, None)

    def test_a_window_after_the_wave(self) -> None:
        """The wave opened at 01:00; the agent's window opens at 02:00 (UTC): wait for it."""
        spec = parse_rollout('waves = ["100%"]\n')
        windows = Maintenance((parse_window("02:00-04:00"),), "UTC")
        now = utc("2026-12-02T01:00:00")
        _, hold = decide(
            spec,
            device_id="d",
            labels=[],
            revision=REV_A,
            commit_time=now,
            now=now,
            agent_windows=windows,
        )
        assert hold is not None and hold.reason == "window"
        assert hold.at == utc("2026-12-02T02:00:00")
        assert hold.message == (
            "waiting for maintenance window at 2026-12-02T02:00:00Z (agent.toml: '02:00-04:00')"
        )
        assert hold.windows == ("agent.toml",)


class TestWindows:
    @pytest.mark.parametrize(
        ("window", "now", "opens"),
        [
            ("02:00-04:00", "2026-12-02T01:59:00", "2026-12-02T02:00:00"),
            ("02:00-04:00", "2026-12-02T03:00:00", "2026-12-02T03:00:00"),  # open now
            ("02:00-04:00", "2026-12-02T04:00:00", "2026-12-03T02:00:00"),  # closed at its end
            ("22:00-02:00", "2026-12-03T01:00:00", "2026-12-03T01:00:00"),  # past midnight
            ("mon-fri 02:00-04:00", "2026-12-05T00:00:00", "2026-12-07T02:00:00"),  # Sat -> Mon
            ("sat,sun 00:00-24:00", "2026-12-02T12:00:00", "2026-12-05T00:00:00"),
            ("fri-mon 10:00-11:00", "2026-12-08T12:00:00", "2026-12-11T10:00:00"),  # wraps
        ],
    )
    def test_daily_ranges(self, window: str, now: str, opens: str) -> None:
        w = parse_window(window)
        assert next_open([((w,), UTC)], utc(now)) == utc(opens)

    def test_cron_window(self) -> None:
        from keystone.windows import cron_window

        w = cron_window("30 3 * * sun", 3600)  # Sundays 03:30-04:30
        assert next_open([((w,), UTC)], utc("2026-12-02T00:00:00")) == utc("2026-12-06T03:30:00")
        assert next_open([((w,), UTC)], utc("2026-12-06T04:00:00")) == utc("2026-12-06T04:00:00")
        assert next_open([((w,), UTC)], utc("2026-12-06T04:30:00")) == utc("2026-12-13T03:30:00")

    def test_both_sets_must_be_open(self) -> None:
        fleet = (parse_window("01:00-03:00"),)
        agent = (parse_window("mon-fri 02:30-05:00"),)
        t = utc("2026-12-05T00:00:00")  # a Saturday
        assert next_open([(fleet, UTC), (agent, UTC)], t) == utc("2026-12-07T02:30:00")

    def test_windows_that_never_overlap(self) -> None:
        a = (parse_window("01:00-02:00"),)
        b = (parse_window("03:00-04:00"),)
        assert next_open([(a, UTC), (b, UTC)], 0.0) is None

    @pytest.mark.parametrize(
        "bad", ["2-4", "02:00-02:00", "xyz 02:00-03:00", "24:00-01:00", "02:60-03:00"]
    )
    def test_bad_ranges(self, bad: str) -> None:
        with pytest.raises(ValueError):
            parse_window(bad)


class TestAgentConfigWindows:
    def test_maintenance_in_agent_toml(self, tmp_path: Path) -> None:
        cfg = parse_config(
            '[maintenance]\nwindows = ["mon-fri 02:00-04:00", { cron = "0 3 * * sun", '
            'duration = "1h" }]\ntimezone = "Europe/Berlin"\n',
            file=str(tmp_path / "agent.toml"),
        )
        assert cfg.maintenance is not None
        assert cfg.maintenance.windows[0].text == "mon-fri 02:00-04:00"
        assert cfg.maintenance.windows[1].cron == "0 3 * * sun"
        assert cfg.maintenance.timezone == "Europe/Berlin"

    @pytest.mark.parametrize(
        ("text", "line", "field"),
        [
            ('[maintenance]\nwindows = ["2am"]\n', 2, "maintenance.windows[0]"),
            (
                '[maintenance]\nwindows = [{ cron = "61 * * * *", duration = "1h" }]\n',
                2,
                "maintenance.windows[0]",
            ),
            (
                '[maintenance]\nwindows = [{ cron = "0 3 * * *" }]\n',
                2,
                "maintenance.windows[0].duration",
            ),
            ("[maintenance]\nwindows = []\n", 2, "maintenance.windows"),
            ('[maintenance]\ntimezone = "UTC"\n', 1, "maintenance.windows"),
            ('[maintenance]\nwindows = ["02:00-03:00"]\nwhen = 1\n', None, None),
        ],
    )
    def test_errors_name_the_line(
        self, tmp_path: Path, text: str, line: int | None, field: str | None
    ) -> None:
        with pytest.raises(ValidationError) as err:
            parse_config(text, file="agent.toml")
        if field is None:
            assert "agent.toml:3: unknown field maintenance.when" in str(err.value)
        else:
            assert (err.value.line, err.value.field) == (line, field), str(err.value)

    def test_a_misspelt_windows_is_named(self) -> None:
        """``window = [...]`` for ``windows``: the error says what the table has instead."""
        with pytest.raises(ValidationError) as err:
            parse_config('[maintenance]\nwindow = ["02:00-03:00"]\n', file="agent.toml")
        assert str(err.value).startswith("agent.toml:1: maintenance.windows: required field")
        assert "it has window instead" in str(err.value)


RECIPE = """\
[metadata]
name = "db"
version = "1.0.0"

[lifecycle.run.exec]
command = "/bin/true"
"""


class TestRecipeDefer:
    def test_defer_parses_and_does_not_change_what_runs(self) -> None:
        plain = parse_recipe(RECIPE, file="db.recipe.toml")
        deferring = parse_recipe(
            RECIPE + '\n[lifecycle.defer]\ncheck = "cmd:./busy"\ntimeout = "2s"\nmax = "10m"\n',
            file="db.recipe.toml",
        )
        assert deferring.defer is not None
        assert (deferring.defer.check, deferring.defer.timeout, deferring.defer.max) == (
            "cmd:./busy",
            2.0,
            600.0,
        )
        # Adding a deferral check is no reason to restart the component.
        assert plain.content_hash() == deferring.content_hash()

    @pytest.mark.parametrize(
        ("body", "field"),
        [
            ('check = "tcp://127.0.0.1:9"', "lifecycle.defer.check"),
            ('check = "ftp://x"', "lifecycle.defer.check"),
            ('check = "cmd:x"\nmax = "forever"', "lifecycle.defer.max"),
            ('timeout = "1s"', "lifecycle.defer.check"),
        ],
    )
    def test_bad_defer(self, body: str, field: str) -> None:
        with pytest.raises(ValidationError) as err:
            parse_recipe(RECIPE + f"\n[lifecycle.defer]\n{body}\n", file="db.recipe.toml")
        assert err.value.field == field and err.value.file == "db.recipe.toml"
        assert err.value.line is not None


class TestDeferAnswer:
    @pytest.mark.parametrize(
        ("text", "seconds"),
        [
            ("defer 30", 30.0),
            ("DEFER 5m\nbusy writing", 300.0),
            ('{"defer": 12.5}', 12.5),
            ("", None),
            ("ok", None),
            ("defer 0", None),
            ("defer soon", None),
            ('{"defer": true}', None),
            ("{not json", None),
        ],
    )
    def test_answers(self, text: str, seconds: float | None) -> None:
        assert parse_defer_answer(text) == seconds


HOSTILE = [
    "waves = [nan]\n",
    'waves = ["nan%"]\n',
    'waves = ["inf%"]\n',
    'waves = ["1e400%"]\n',
    'waves = ["-5%", "100%"]\nwait = "1h"\n',
    'waves = "100%"\n',
    "waves = []\n",
    "waves = [[0.5], 1]\n",
    'waves = ["1%", "100%"]\nwait = [1]\n',
    'waves = ["1%", "100%"]\nwait = "99999999999999999999h"\n',
    "labels = 1\n",
    "[labels]\nx = 1\n",
    "[[labels]]\n",
    '[labels."a b"]\nhalted = true\n',
    "halted = true\nhalted = false\n",
    'canary_labels = "canary"\n',
    '[maintenance]\nwindows = "02:00-04:00"\n',
    "[maintenance]\nwindows = [1]\n",
    '[maintenance]\nwindows = [{ cron = "* * *", duration = "1h" }]\n',
    '[maintenance]\nwindows = [{ cron = "0 3 * * *", duration = "0s" }]\n',
    '[maintenance]\nwindows = [{ cron = "0 3 31 2 *", duration = "1h" }]\n',
    '[maintenance]\nwindows = [{ cron = "0 3 * * *", duration = "1h", x = 1 }]\n',
    "[maintenance]\nwindows = [" + ", ".join(['"01:00-02:00"'] * 65) + "]\n",
    "waves = [" + ", ".join(f'"{i}%"' for i in range(1, 35)) + "]\n",
    "a = " + "[" * 200 + "]" * 200 + "\n",
    "\x00",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_rollout_files_are_refused_with_our_errors(text: str) -> None:
    """Whatever the file holds, only a located ValidationError comes out (nothing foreign)."""
    with pytest.raises(ValidationError) as err:
        parse_rollout(text, file="rollout.toml")
    assert "rollout.toml" in str(err.value)
