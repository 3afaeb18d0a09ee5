"""The README's API snippet runs as written and prints the shapes it claims."""
import ast
import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_api_snippet_runs():
    text = README.read_text()
    api = text[text.index('## API'):]
    code = re.search(r'```python\n(.*?)```', api, re.S).group(1)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, 'README.md', 'exec'), {})
    claimed = ast.literal_eval(re.search(r'print\(.*?\)\s+# (\[.*\])', code).group(1))
    assert ast.literal_eval(printed.getvalue().strip()) == claimed
