"""megatron-core's known, harmless warnings are silenced by exact message when megatron_moma is
imported (in a fresh interpreter, as every rank and spawned writer is), and nothing else is."""

import subprocess
import sys

from megatron_moma.platform import known_warnings


def stderr_of(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    return result.stderr


def test_megatron_core_fallback_warnings_are_silenced_and_others_still_show():
    stderr = stderr_of(
        "import warnings, logging\n"
        "import megatron_moma\n"
        "import megatron.core.optimizer, megatron.core.models.gpt.gpt_layer_specs\n"
        "warnings.warn('Apex is not installed, says someone else')\n"
        "warnings.warn('an unrelated warning')\n"
        "logging.getLogger('megatron.core.transformer.transformer_layer').warning("
        "'Unknown MLP type: X. Using default kwargs.')\n"
        "logging.getLogger('megatron.core.transformer.transformer_layer').warning('another')\n")
    assert "Transformer Engine and Apex are not installed" not in stderr
    assert "Falling back to Torch Norm" not in stderr
    assert "Unknown MLP type" not in stderr
    # Only megatron-core's own are silenced: the same words from elsewhere, and other
    # warnings and log records of that logger, still show.
    assert "Apex is not installed, says someone else" in stderr
    assert "an unrelated warning" in stderr
    assert "another" in stderr


def test_without_the_filters_megatron_core_does_warn():
    """The test above can fail: the same imports without megatron_moma print the warnings."""
    stderr = stderr_of("import megatron.core.optimizer")
    assert "Transformer Engine and Apex are not installed" in stderr


def test_the_fallbacks_are_reported_in_one_line():
    report = known_warnings.fallback_report()
    assert report is not None and "\n" not in report  # TE and Apex are absent here
    assert "Transformer Engine and Apex are not installed" in report
