"""Packaging: no documented install ends with two TensorFlow builds in one environment.

`tensorflow` and `tensorflow-cpu` (and the other builds below) all write the same `tensorflow/`
package, so an environment holding two of them keeps whichever pip unpacked last: a GPU build
can be silently replaced by the CPU one. Offline: reads setup.cfg, README.md, .ci/run and the
metadata of what is installed here; never the network.
"""

import configparser
import itertools
import os
import re
import shlex
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Distributions that install the `tensorflow` Python package: at most one may be required.
TENSORFLOW_BUILDS = frozenset(
    canonicalize_name(n)
    for n in (
        "tensorflow",
        "tensorflow-cpu",
        "tensorflow-gpu",
        "tf-nightly",
        "tf-nightly-cpu",
        "tf-nightly-gpu",
        "intel-tensorflow",
        "tensorflow-rocm",
        "tensorflow-aarch64",
        "tensorflow-macos",
    )
)

# The platforms a user may install on: every marker in the requirements is evaluated on each.
PLATFORMS = [
    {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64"},
    {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": "aarch64"},
    {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix", "platform_machine": "arm64"},
    {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix", "platform_machine": "x86_64"},
    {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt", "platform_machine": "AMD64"},
    {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt", "platform_machine": "ARM64"},
]
ENVIRONMENTS = [
    {
        **platform,
        "python_version": version,
        "python_full_version": f"{version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    for platform in PLATFORMS
    for version in ("3.11", "3.12", "3.13")
]

# A GPU TensorFlow installed before kft (TensorFlow's own GPU command, as in a GPU container):
# installing kft afterwards must keep it, i.e. add no second build.
PREINSTALLED_GPU_TENSORFLOW = 'pip install "tensorflow[and-cuda]==2.21.*"'


def read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


def _requirement_lines(value: str) -> list[str]:
    lines = (line.split(" #", 1)[0].strip() for line in value.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def kft_requirements(setup_cfg_text: str) -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """install_requires and extras_require of setup.cfg, as packaging Requirements."""
    config = configparser.ConfigParser(interpolation=None)
    config.read_string(setup_cfg_text)
    base = [Requirement(line) for line in _requirement_lines(config.get("options", "install_requires", fallback=""))]
    extras = {}
    if config.has_section("options.extras_require"):
        for extra, value in config.items("options.extras_require"):
            extras[canonicalize_name(extra)] = [Requirement(line) for line in _requirement_lines(value)]
    return base, extras


def pip_install_commands(text: str) -> list[str]:
    """Every `pip install ...` command in a text (README code blocks and inline code alike)."""
    commands = []
    for match in re.finditer(r"pip3? install\b([^`\n&;|)]*)", text):
        commands.append("pip install" + match.group(1).rstrip())
    return commands


_OPTIONS_WITH_A_VALUE = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
}


def command_requirements(command: str) -> list[Requirement]:
    """What one `pip install` names: `kft[x,y]` for `.`/`-e ".[x,y]"`, and the other requirements."""
    words = iter(shlex.split(command)[2:])
    asked = []
    for word in words:
        if word in _OPTIONS_WITH_A_VALUE:
            next(words, None)
            continue
        if word.startswith("-"):
            continue  # -e, -U, --upgrade, ...: options, not requirements.
        if word == "." or word.startswith(".["):
            asked.append(Requirement("kft" + word[1:]))
        else:
            asked.append(Requirement(word))
    return asked


def expand(
    asked: list[Requirement], base: list[Requirement], extras: dict[str, list[Requirement]], environment: dict
) -> set[str]:
    """The distribution names one install needs on `environment`: the named requirements, and
    for kft (with its extras, self-references `kft[x]` included) its own requirements."""
    names: set[str] = set()
    seen_kft_extras: set[str | None] = set()
    todo = list(asked)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name != "kft":
            names.add(name)
            continue
        for extra in [None, *sorted(canonicalize_name(e) for e in requirement.extras)]:
            if extra in seen_kft_extras:
                continue
            seen_kft_extras.add(extra)
            assert extra is None or extra in extras, f"README installs kft[{extra}], which setup.cfg does not define"
            for dependency in base if extra is None else extras[extra]:
                if dependency.marker is None or dependency.marker.evaluate({**environment, "extra": extra or ""}):
                    todo.append(dependency)
    return names


def two_builds(names: set[str]) -> set[str]:
    builds = names & TENSORFLOW_BUILDS
    return builds if len(builds) > 1 else set()


def conflicts(setup_cfg_text: str, commands: list[str], preinstalled=(PREINSTALLED_GPU_TENSORFLOW,)) -> list[str]:
    """Each documented install, alone, after another documented install, or after a GPU
    TensorFlow, that can end with two TensorFlow builds, on which platform, and which."""
    base, extras = kft_requirements(setup_cfg_text)
    scenarios = [(c,) for c in commands]
    scenarios += list(itertools.combinations(commands, 2))
    scenarios += [(p, c) for p in preinstalled for c in commands]
    found = []
    for scenario in scenarios:
        asked = [r for command in scenario for r in command_requirements(command)]
        for environment in ENVIRONMENTS:
            builds = two_builds(expand(asked, base, extras, environment))
            if builds:
                where = (
                    f"{environment['sys_platform']}/{environment['platform_machine']}/py{environment['python_version']}"
                )
                found.append(f"{' then '.join(scenario)} on {where}: {sorted(builds)}")
                break
    return found


def test_readme_documents_a_cpu_and_a_gpu_install():
    commands = pip_install_commands(read("README.md"))
    assert any("-e ." in c or '-e ".[' in c for c in commands), commands
    assert any("and-cuda" in c or "[gpu]" in c for c in commands), f"no NVIDIA GPU install in README: {commands}"
    assert any("[test]" in c for c in commands), commands


def test_no_documented_install_pulls_two_tensorflow_builds():
    commands = pip_install_commands(read("README.md")) + pip_install_commands(read(".ci/run"))
    assert len(commands) >= 3, commands
    assert conflicts(read("setup.cfg"), commands) == []


def test_the_check_catches_the_cpu_wheel_next_to_the_gpu_one():
    """The check itself: the setup.cfg of kft 0.1.0 (tensorflow-cpu on x86_64) and README's
    GPU install (tensorflow[and-cuda] first, then kft) are caught, on x86_64 only."""
    old = """
[options]
install_requires =
    # The CPU wheel.
    tensorflow-cpu>=2.21,<2.22; platform_machine == "x86_64"
    tensorflow>=2.21,<2.22; platform_machine != "x86_64"
    keras>=3.15,<4
[options.extras_require]
test =
    pytest>=8
"""
    found = conflicts(old, ["pip install -e ."])
    assert found == [
        'pip install "tensorflow[and-cuda]==2.21.*" then pip install -e . on linux/x86_64/py3.11: '
        "['tensorflow', 'tensorflow-cpu']"
    ], found
    assert conflicts(old, ['pip install "tensorflow[and-cuda]"', "pip install -e ."], preinstalled=())
    # The CPU installs alone were fine: the check is not merely always failing.
    assert conflicts(old, ["pip install -e .", 'pip install -e ".[test]"'], preinstalled=()) == []
    # An extra that adds the other build is caught too.
    assert conflicts(old + "gpu =\n    tensorflow[and-cuda]>=2.21\n", ['pip install -e ".[gpu]"'])


@pytest.mark.parametrize(
    "command, expected",
    [
        ('pip install -e ".[test]"', ["kft[test]"]),
        ('pip install "tensorflow[and-cuda]==2.21.*"', ["tensorflow[and-cuda]==2.21.*"]),
        ("pip install -U -e .", ["kft"]),
        ("pip install -c constraints.txt -e '.[gpu,test]' pytest-timeout", ["kft[gpu,test]", "pytest-timeout"]),
    ],
)
def test_command_parsing(command, expected):
    assert [str(r) for r in command_requirements(command)] == expected


def test_dependencies_do_not_bring_their_own_tensorflow():
    """keras, tensorflow-datasets, keras-tuner, tensorboard...: with the extras kft asks of them,
    none requires a TensorFlow build (tensorflow-datasets[tensorflow] or keras-tuner[tensorflow-cpu]
    would). Walks the installed metadata of kft's dependencies, transitively; what is not
    installed here is skipped."""
    base, extras = kft_requirements(read("setup.cfg"))
    todo = [
        r
        for r in [*base, *itertools.chain(*extras.values())]
        if canonicalize_name(r.name) not in TENSORFLOW_BUILDS | {"kft"}
    ]
    checked, problems = set(), []
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in checked:
            continue
        checked.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for line in requires:
            dependency = Requirement(line)
            active = any(
                dependency.marker is None or dependency.marker.evaluate({**environment, "extra": extra})
                for environment in ENVIRONMENTS
                for extra in ["", *requirement.extras]
            )
            if not active:
                continue
            if canonicalize_name(dependency.name) in TENSORFLOW_BUILDS:
                problems.append(f"{requirement} requires {dependency}")
            else:
                todo.append(dependency)
    assert problems == []
    assert ("keras", frozenset()) in checked


def test_this_environment_holds_one_tensorflow_build():
    """`pip check` cannot see it: two builds here overwrote each other's `tensorflow/` files
    (e.g. a virtual environment made when kft asked for `tensorflow-cpu`, installed again)."""
    installed = sorted(
        {canonicalize_name(d.metadata["Name"] or "") for d in metadata.distributions()} & TENSORFLOW_BUILDS
    )
    assert len(installed) <= 1, (
        f"{' and '.join(installed)} are both installed and share the tensorflow/ package; "
        f'start again: pip uninstall -y {" ".join(installed)} && pip install -e ".[test]"'
    )


def test_ci_installs_as_readme_says_then_runs_pip_check():
    ci = read(".ci/run")
    install = re.search(r"pip install [^&\n]*", ci).group(0).strip()
    assert install in read("README.md"), install
    assert re.search(r"pip install [^\n]*\n(.*\n)*.*\bpip check\b", ci) or re.search(
        r"pip install [^&\n]*&&[^\n]*\bpip check\b", ci
    ), ci
    # The README's test command after the install (lint, format check, pytest) is what CI runs.
    tests = ci.split("pip check && ", 1)[1].strip()
    readme_command = next(line for line in read("README.md").splitlines() if ".[test]" in line and "pytest" in line)
    assert readme_command.endswith(tests), (readme_command, tests)
