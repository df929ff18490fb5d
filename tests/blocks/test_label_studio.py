from blocks.label_studio import LabelStudio


def test_the_key_stays_secret_and_the_url_is_normalized():
    block = LabelStudio(url="http://ls.internal:8080/", api_key="0123456789abcdef")
    assert block.url == "http://ls.internal:8080"
    assert "0123456789abcdef" not in repr(block) + str(block) + block.model_dump_json()
    assert block.api_key.get_secret_value() == "0123456789abcdef"
