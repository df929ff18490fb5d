import pytest

from tasks.config import SpecError
from tasks.scoring.compare import Variant, check_variants


def test_check_variants_names_the_problem():
    with pytest.raises(SpecError, match="at least two"):
        check_variants([Variant(name="a")])
    with pytest.raises(SpecError, match="names must be unique"):
        check_variants([Variant(name="a"), Variant(name="a")])
