import pytest

from service.chat_template import ChatTemplate, TemplateError
from service.errors import InvalidArgument


def gemma() -> ChatTemplate:
    return ChatTemplate.for_model(None, "gemma3", bos_token="<bos>", eos_token="<eos>")


def test_gemma_turns_and_generation_prompt():
    prompt = gemma().render(
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"},
        ]
    )
    assert prompt == (
        "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_puts_system_text_at_the_head_of_the_next_user_turn():
    prompt = gemma().render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_embedded_template_wins_over_builtin():
    template = ChatTemplate.for_model(
        "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}",
        "gemma3",
        bos_token="<s>",
        eos_token="</s>",
    )
    assert template.render([{"role": "user", "content": "x"}]) == "<s>[user]x"


def test_unknown_architecture_without_template_is_an_error():
    with pytest.raises(TemplateError):
        ChatTemplate.for_model(None, "mystery", bos_token="", eos_token="")


def test_template_exception_becomes_invalid_argument_on_messages():
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}", bos_token="", eos_token="")
    with pytest.raises(InvalidArgument) as error:
        template.render([{"role": "user", "content": "x"}])
    assert error.value.param == "messages" and "roles must alternate" in error.value.message
