"""Sphinx extension of the book: dataclass fields in the API reference.

autodoc lists every field of a dataclass as an attribute, and with no doc comment each entry is a bare
``name: type = default`` repeating the signature. This extension gives the fields of ``TrainConfig`` and
``AlgoConfig`` the help text the command line shows for them (``grpo_ref.__main__.field_help``: one source for
both), and leaves out the fields of the other dataclasses, whose class docstrings describe them. A field with a
``default_factory`` shows the value the factory makes (``algo_overrides={}``), not autodoc's ``<factory>``.
"""
import dataclasses
import sys

from sphinx.ext.autodoc import AttributeDocumenter, Documenter


def _helped_classes():
    from grpo_ref.algorithms import AlgoConfig
    from grpo_ref.trainer import TrainConfig

    return (TrainConfig, AlgoConfig)


def _is_field(cls, name: str) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}


class HelpedFieldDocumenter(AttributeDocumenter):
    """A field of ``TrainConfig`` / ``AlgoConfig``, documented with its command-line help."""

    # Its own objtype (the output is still a py:attribute): napoleon reads an "attribute" docstring as "type:
    # description" and would take the help's first words for a type.
    objtype = "helpedfield"
    directivetype = "attribute"
    priority = AttributeDocumenter.priority + 1

    @classmethod
    def can_document_member(cls, member, membername, isattr, parent) -> bool:
        return (isinstance(parent, Documenter) and parent.object in _helped_classes()
                and _is_field(parent.object, membername))

    def get_doc(self):
        from grpo_ref.__main__ import field_help

        text = field_help(self.parent, self.objpath[-1])
        if not text:
            return super().get_doc()
        # as written (a flag's "--" escaped so that it is not typeset as a dash), ended with a full stop
        text = text.replace("--", "\\-\\-")
        return [[text + ("" if text.endswith(".") else "."), ""]]


def _class_being_documented():
    """The class whose members autodoc is filtering, read from the calling frames (the hook is not given it)."""
    frame = sys._getframe(2)
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Documenter):
            return owner.object
        frame = frame.f_back
    return None


def _skip_member(app, what, name, obj, skip, options):
    """Leave out the undocumented fields of the other dataclasses (their class docstrings describe them)."""
    if what != "class":
        return None
    cls = _class_being_documented()
    if not _is_field(cls, name) or cls in _helped_classes():
        return None
    return True


def _factory_defaults(app, what, name, obj, options, signature, return_annotation):
    if what != "class" or not signature or not (isinstance(obj, type) and dataclasses.is_dataclass(obj)):
        return None
    for f in dataclasses.fields(obj):
        if f.default_factory is not dataclasses.MISSING:
            signature = signature.replace(f"{f.name}=<factory>", f"{f.name}={f.default_factory()!r}")
    return signature, return_annotation


def setup(app):
    app.setup_extension("sphinx.ext.autodoc")
    app.add_autodocumenter(HelpedFieldDocumenter)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("autodoc-process-signature", _factory_defaults)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
