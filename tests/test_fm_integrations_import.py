"""`import fm` needs no integration's trainer; an integration without its trainer installed
fails with an ImportError that names the extra to install."""

import subprocess
import sys


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_tunix_integration_without_tunix_names_the_extra():
    # sys.modules[name] = None makes `import name` raise ImportError, as if not installed.
    done = _python(
        "import sys; sys.modules['tunix'] = None\n"
        "import fm, fm.integrations\n"
        "try:\n"
        "    import fm.integrations.tunix\n"
        "except ImportError as e:\n"
        "    print('IMPORT-ERROR:', e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "IMPORT-ERROR:" in done.stdout, done.stdout
    assert "google-tunix" in done.stdout and '".[tunix]"' in done.stdout, done.stdout


def test_fm_imports_no_integration():
    done = _python(
        "import sys, fm, fm.integrations\n"
        "print(sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] == 'tunix' or m.startswith('fm.integrations.')))"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
