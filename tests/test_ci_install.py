"""CI installs exactly what the README tells a new user to install: the install part of the
README's test command and the install lines of .ci/run are the same words."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shell_words(text: str) -> str:
    """`text` with line continuations joined and white space folded."""
    return " ".join(text.replace("\\\n", " ").split())


def readme_command(title: str) -> str:
    """The fenced bash block that follows the bold `title` in README.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(re.escape(f"**{title}**") + r".*?```bash\n(.*?)```", readme, re.S)
    assert match, f"README.md has no bash block after **{title}**"
    return shell_words(match.group(1))


def test_ci_installs_what_the_readme_test_command_installs():
    readme_install = readme_command("Set up and run the tests").split(" && python -m pytest")[0]
    ci = shell_words((ROOT / ".ci" / "run").read_text(encoding="utf-8"))
    assert readme_install.startswith("pip install torch==")
    assert readme_install in ci


def test_the_main_job_installs_the_same_way():
    main_job = readme_command("Set up and run the main job")
    readme_install = readme_command("Set up and run the tests").split(" && python -m pytest")[0]
    assert main_job.startswith(readme_install + " && bash examples/")
