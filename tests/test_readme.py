"""The README's usage example runs as written."""
import os
import re

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_usage_example_runs():
    text = open(README).read()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
