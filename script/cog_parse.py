"""predict.py as `cog build` reads it: Cog's static parse of the predictor's Input() declarations.

The OpenAPI document made from the parse, and what the parse changes silently: script/openapi_schema.py.

Since Cog 0.17 the CLI parses predict.py statically (tree-sitter) instead of running Cog's Python inspector, so
what a predictor declares reaches the schema only in the forms that parser reads. This module applies the same
rules, taken from replicate/cog at 6110c91:

- pkg/schema/python/inputs.go (parseTypedDefaultParameter, parseInputCall): only keyword arguments of Input()
  are read. `default=` goes through resolveDefaultExpr and silently becomes None when it cannot be resolved;
  `description=` is a string literal or a module-level name bound to one, else dropped; `ge=`, `le=`,
  `min_length=`, `max_length=` are read only as number literals (parseNumberLiteral: strconv.ParseFloat of the
  source text, so every bound becomes a float64), else dropped; `choices=` that cannot be resolved fails the
  build (ErrChoicesNotResolvable), as does a plain (non-Input) default that cannot (ErrDefaultNotResolvable).
- pkg/schema/python/literals.go (parseDefaultValue, parseStringLiteral, parseListLiteral): literals are read
  from their source text. A string keeps its escapes as written and loses only its outer quotes (so implicitly
  concatenated literals keep the `" "` between their pieces); an f-string, a byte string or any other prefix but
  `r` is not a string literal. A tuple keeps the items it can read; a list is all or nothing.
- pkg/schema/python/module_scope.go (collectModuleScope, resolveChoicesExpr): names bound at the top level of
  predict.py to a literal; choices may be a list literal, such a name, `list(D.keys())` or `list(D.values())` of
  a module-level dict literal, or `+` of those. Nothing imported from another module resolves.
- pkg/schema/python/annotations.go and pkg/schema/types.go (ResolveInputType): the input types.

Where Cog's parser fails the build, `parse_predictor` raises CogSchemaError. Where Cog silently drops or changes a
value, it computes what Cog would get (script/openapi_schema.py's `silent_changes` lists every difference from what
Python sees when it imports predict.py; the tests fail on any). A form whose outcome in Cog's parser this module
does not model (a number written with underscores, a quoted type annotation, ...) is a CogSchemaError too, rather
than a guess.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PREDICTOR = "predict.py:Predictor"

_PRIMITIVES = {  # PrimitiveFromName and PrimitiveType.JSONType (pkg/schema/types.go)
    "bool": {"type": "boolean"},
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "str": {"type": "string"},
    "Path": {"type": "string", "format": "uri"},
    "File": {"type": "string", "format": "uri"},
    "Secret": {"type": "string", "format": "password", "writeOnly": True, "x-cog-secret": True},
}
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")  # what ParseFloat and Python read alike
_UNDERSCORED = re.compile(r"[+-]?\d[\w.+-]*_[\w.+-]*")  # a number written with "_" (names start with a letter)


def _check_modelled(text: str) -> None:
    if _UNDERSCORED.fullmatch(text):
        raise CogSchemaError(f"{text}: numbers with underscores are not modelled; write the number without them")
    if re.fullmatch(r"[+-]?(inf|infinity|nan)", text, re.IGNORECASE):
        raise CogSchemaError(f"{text}: Go reads this name as a number; not modelled")


class CogSchemaError(ValueError):
    """predict.py uses a form Cog's static parser refuses (the build fails), or one this module does not model."""


class _SetValue(list):
    """A set literal's items (DefaultSet): a default like a list, but not choices."""


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


UNSET = _Unset()
"""No value: the keyword was not given, or (for bounds and descriptions) Cog dropped it."""


@dataclass
class InputType:
    """Cog's recursive input type (schema.InputType): a primitive, any JSON, an array or a union."""

    kind: str  # "primitive", "any", "array", "union"
    primitive: str = ""
    elem: InputType | None = None
    variants: list[InputType] = field(default_factory=list)
    nullable: bool = False

    def json(self) -> dict:  # inputTypeJSONSchema
        if self.kind == "primitive":
            schema = dict(_PRIMITIVES[self.primitive])
        elif self.kind == "array":
            schema = {"type": "array", "items": self.elem.json() if self.elem else {"type": "object"}}
        elif self.kind == "union":
            variants = [v.json() | ({"nullable": True} if self.nullable else {}) for v in self.variants]
            schema = {"anyOf": variants}
        else:
            schema = {"type": "object"}
        if self.nullable:
            schema["nullable"] = True
        return schema

    @property
    def repetition(self) -> str:  # fieldTypeFromInputType: "required", "optional", "repeated", "optional_repeated"
        if self.kind == "array":
            return "optional_repeated" if self.nullable else "repeated"
        return "optional" if self.nullable else "required"

    @property
    def primitive_json(self) -> dict:  # FieldType.Primitive.JSONType(), the type of a choices enumeration
        if self.kind == "primitive":
            return _PRIMITIVES[self.primitive]
        if self.kind == "array" and self.elem is not None and self.elem.kind == "primitive":
            return _PRIMITIVES[self.elem.primitive]
        return {"type": "object"}


@dataclass
class CogInput:
    """One input as Cog's static parser reads it (schema.InputField); UNSET where Cog has no value."""

    name: str
    order: int
    type: InputType
    default: Any = UNSET
    description: Any = UNSET
    ge: Any = UNSET
    le: Any = UNSET
    min_length: Any = UNSET
    max_length: Any = UNSET
    regex: Any = UNSET
    choices: Any = UNSET
    deprecated: Any = UNSET


@dataclass
class CogPredictor:
    inputs: list[CogInput]
    output: dict


# ---- literals (literals.go) ------------------------------------------------------------------------------


class _Source:
    def __init__(self, text: str):
        self.text = text
        self.tree = ast.parse(text)

    def segment(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ""


def _string_literal(src: _Source, node: ast.AST) -> Any:
    """parseStringLiteral: the source text without its outer quotes, escapes as written; UNSET if not a plain
    or r-prefixed literal (f-strings, byte strings, u-prefixed ones)."""
    if not isinstance(node, (ast.Constant, ast.JoinedStr)):
        return UNSET
    text = src.segment(node)
    if text.startswith(('"""', "'''")):
        return text[3:-3] if len(text) >= 6 else UNSET
    if text.startswith(('"', "'")):
        return text[1:-1] if len(text) >= 2 else UNSET
    if text.startswith(('r"', "r'")):
        return text[2:-1] if len(text) >= 3 else UNSET
    return UNSET


def _int_literal(text: str) -> Any:
    """strconv.ParseInt(text, 0, 64), for the literal forms Python and Go share."""
    _check_modelled(text)
    try:
        value = int(text, 0)
    except ValueError:
        return UNSET
    return value if -(2**63) <= value < 2**63 else UNSET


def _float_literal(text: str) -> Any:
    """strconv.ParseFloat(text, 64) for decimal literals; UNSET for anything else (names, expressions)."""
    text = text.strip()
    _check_modelled(text)
    return float(text) if _NUMBER.fullmatch(text) else UNSET


def _default_value(src: _Source, node: ast.AST) -> Any:
    """parseDefaultValue: the literal's value, UNSET when Cog cannot read it."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return _int_literal(src.segment(node))
        if isinstance(value, float):
            return _float_literal(src.segment(node))
        if isinstance(value, str):
            return _string_literal(src, node)
        return UNSET  # bytes, complex, Ellipsis
    if isinstance(node, ast.JoinedStr):
        return _string_literal(src, node)
    if isinstance(node, (ast.List, ast.Set)):
        items = [_default_value(src, item) for item in node.elts]
        if any(item is UNSET for item in items):
            return UNSET
        return _SetValue(items) if isinstance(node, ast.Set) else items
    if isinstance(node, ast.Tuple):
        return [item for item in (_default_value(src, e) for e in node.elts) if item is not UNSET]
    if isinstance(node, ast.Dict):
        pairs = {}
        for key, value in zip(node.keys, node.values, strict=True):
            if key is None:
                continue
            k, v = _default_value(src, key), _default_value(src, value)
            if k is not UNSET and v is not UNSET:
                pairs[k if isinstance(k, str) else json.dumps(k)] = v
        return pairs
    if isinstance(node, ast.UnaryOp):
        text = src.segment(node).strip()
        value = _int_literal(text)
        return value if value is not UNSET else _float_literal(text)
    return UNSET


def _number_literal(src: _Source, node: ast.AST) -> Any:
    """parseNumberLiteral: the source text through strconv.ParseFloat, so always a float."""
    return _float_literal(src.segment(node))


# ---- module scope (module_scope.go) ----------------------------------------------------------------------


def _module_scope(src: _Source) -> dict[str, Any]:
    """Top-level `NAME = literal` (or `NAME: T = literal`) bindings; a later binding wins."""
    scope: dict[str, Any] = {}
    for stmt in src.tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target, value = stmt.targets[0].id, stmt.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            target, value = stmt.target.id, stmt.value
        else:
            continue
        parsed = _default_value(src, value)
        if parsed is not UNSET:
            scope[target] = parsed
    return scope


def _resolve_default(src: _Source, node: ast.AST, scope: dict) -> Any:
    value = _default_value(src, node)
    if value is UNSET and isinstance(node, ast.Name):
        return scope.get(node.id, UNSET)
    return value


def _resolve_string(src: _Source, node: ast.AST, scope: dict) -> Any:
    value = _string_literal(src, node)
    if value is UNSET and isinstance(node, ast.Name) and isinstance(scope.get(node.id), str):
        return scope[node.id]
    return value


def _resolve_choices(src: _Source, node: ast.AST, scope: dict) -> Any:
    """resolveChoicesExpr: a list literal, a module-level name bound to a list (or tuple), list(D.keys()) or
    list(D.values()) of a module-level dict, or `+` of those; UNSET otherwise (the build fails)."""
    if isinstance(node, ast.List):
        return _default_value(src, node)
    if isinstance(node, ast.Name):
        value = scope.get(node.id, UNSET)
        return value if isinstance(value, list) and not isinstance(value, _SetValue) else UNSET
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _resolve_choices(src, node.left, scope), _resolve_choices(src, node.right, scope)
        return UNSET if left is UNSET or right is UNSET else left + right
    if (
        isinstance(node, ast.Call)
        and src.segment(node.func) == "list"
        and node.args
        and isinstance(node.args[0], ast.Call)
        and isinstance(node.args[0].func, ast.Attribute)
        and isinstance(node.args[0].func.value, ast.Name)
    ):
        method, name = node.args[0].func.attr, node.args[0].func.value.id
        value = scope.get(name, UNSET)
        if isinstance(value, dict) and method in ("keys", "values"):
            return list(value.keys() if method == "keys" else value.values())
    return UNSET


# ---- types (annotations.go, types.go) --------------------------------------------------------------------


def _annotation(src: _Source, node: ast.AST) -> tuple:
    """(kind, name, args) as parseTypeAnnotation makes it: ("simple", name), ("generic", outer, args) or
    ("union", members)."""
    if isinstance(node, ast.Name):
        return ("simple", node.id, ())
    if isinstance(node, ast.Attribute):
        return ("simple", src.segment(node), ())
    if isinstance(node, ast.Constant) and node.value is None:
        return ("simple", "None", ())
    if isinstance(node, ast.Subscript):
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        return ("generic", src.segment(node.value), tuple(_annotation(src, a) for a in args))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
        members = []
        for side in (node.left, node.right):
            parsed = _annotation(src, side)
            members += parsed[2] if parsed[0] == "union" else [parsed]
        return ("union", "", tuple(members))
    raise CogSchemaError(f"type annotation {src.segment(node)!r} is not modelled")


def _input_type(ann: tuple) -> InputType:
    """resolveInputType for the annotations a predictor uses: primitives, list/List, Optional, X | None, dict."""
    kind, name, args = ann
    name = name.rsplit(".", 1)[-1]  # ResolveQualifiedName: cog.Path is Path
    if kind == "simple":
        if name in ("dict", "Dict", "Any"):
            return InputType("any")
        if name not in _PRIMITIVES:
            raise CogSchemaError(f"{name} is not a type Cog accepts for an input")
        return InputType("primitive", name)
    if kind == "generic":
        if name in ("dict", "Dict"):
            return InputType("any")
        if name == "Optional" and len(args) == 1:
            inner = _input_type(args[0])
            inner.nullable = True
            return inner
        if name in ("list", "List") and len(args) == 1:
            inner = _input_type(args[0])
            if inner.nullable or inner.kind in ("array", "union"):
                raise CogSchemaError("nested generics like List[Optional[X]] are not supported")
            return InputType("array", elem=inner)
        if name == "Union":
            return _input_type(("union", "", args))
        raise CogSchemaError(f"{name}[...] is not a supported input type")
    variants = [_input_type(a) for a in args if a != ("simple", "None", ())]
    nullable = len(variants) < len(args)
    if not variants:
        raise CogSchemaError("union inputs must include at least one non-None type")
    if len(variants) == 1:
        variants[0].nullable = variants[0].nullable or nullable
        return variants[0]
    raise CogSchemaError("unions of several types are not modelled")


# ---- inputs (inputs.go) ----------------------------------------------------------------------------------


def _input_names(src: _Source) -> set[str]:
    """isInputCall: `Input`, or the name `from cog import Input as NAME` gives it (not `cog.Input`)."""
    names = {"Input"}
    for stmt in src.tree.body:
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "cog":
            names |= {a.asname for a in stmt.names if a.name == "Input" and a.asname}
    return names


def _is_input_call(src: _Source, node: ast.AST, names: set[str]) -> bool:
    return isinstance(node, ast.Call) and src.segment(node.func) in names


def _input_call(src: _Source, call: ast.Call, name: str, scope: dict, cog_input: CogInput) -> None:
    """parseInputCall: the keywords Cog reads, into `cog_input`."""
    for keyword in call.keywords:
        key, value = keyword.arg, keyword.value
        if key == "default":
            resolved = _resolve_default(src, value, scope)
            cog_input.default = None if resolved is UNSET else resolved
        elif key == "default_factory":
            raise CogSchemaError(f"{name}: default_factory is not supported in static schema generation")
        elif key == "description":
            cog_input.description = _resolve_string(src, value, scope)
        elif key in ("ge", "le"):
            setattr(cog_input, key, _number_literal(src, value))
        elif key in ("min_length", "max_length"):
            number = _number_literal(src, value)
            setattr(cog_input, key, UNSET if number is UNSET else int(number))
        elif key == "regex":
            cog_input.regex = _string_literal(src, value)
        elif key == "choices":
            choices = _resolve_choices(src, value, scope)
            if choices is UNSET:
                raise CogSchemaError(
                    f"{name}: choices expression cannot be statically resolved (Cog: {src.segment(value)})"
                )
            cog_input.choices = choices
        elif key == "deprecated":
            cog_input.deprecated = (
                value.value if isinstance(value, ast.Constant) and isinstance(value.value, bool) else UNSET
            )


def _target_function(src: _Source, class_name: str) -> ast.FunctionDef:
    for stmt in src.tree.body:
        if isinstance(stmt, ast.ClassDef) and stmt.name == class_name:
            methods = {s.name: s for s in stmt.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
            method = methods.get("run") or methods.get("predict")
            if method is None:
                raise CogSchemaError(f"{class_name} must define run() or predict()")
            return method
    raise CogSchemaError(f"predictor {class_name} not found")


def parse_predictor(source: str, class_name: str = "Predictor") -> CogPredictor:
    """The inputs and output Cog's static parser reads from predict.py's `source`."""
    src = _Source(source)
    scope = _module_scope(src)
    input_names = _input_names(src)
    func = _target_function(src, class_name)
    params = [*func.args.posonlyargs, *func.args.args]
    defaults = [None] * (len(params) - len(func.args.defaults)) + list(func.args.defaults)
    pairs = list(zip(params, defaults, strict=True))
    pairs += list(zip(func.args.kwonlyargs, func.args.kw_defaults, strict=True))
    if pairs and pairs[0][0].arg == "self":
        pairs = pairs[1:]
    inputs = []
    for order, (arg, default) in enumerate(pairs):
        if arg.annotation is None:
            raise CogSchemaError(f"parameter '{arg.arg}' has no type annotation")
        cog_input = CogInput(arg.arg, order, _input_type(_annotation(src, arg.annotation)))
        if default is not None and _is_input_call(src, default, input_names):
            _input_call(src, default, arg.arg, scope, cog_input)
        elif default is not None:
            resolved = _resolve_default(src, default, scope)
            if resolved is UNSET:
                raise CogSchemaError(
                    f"parameter '{arg.arg}': default `{src.segment(default)}` cannot be statically resolved"
                )
            cog_input.default = resolved
        if cog_input.type.kind == "union" and any(
            getattr(cog_input, k) is not UNSET for k in ("choices", "ge", "le", "min_length", "max_length", "regex")
        ):
            raise CogSchemaError("constraints and choices are not supported on union inputs")
        inputs.append(cog_input)
    if func.returns is None:
        raise CogSchemaError(f"{func.name} has no return type")
    output = _input_type(_annotation(src, func.returns))
    if output.kind != "primitive":
        raise CogSchemaError("only a single file or value as output is modelled")
    return CogPredictor(inputs, {**_PRIMITIVES[output.primitive], "title": "Output"})


# ---- the document (openapi_spec.go) ----------------------------------------------------------------------


def split_ref(predictor_ref: str) -> tuple[Path, str]:
    module_file, class_name = predictor_ref.split(":")
    return ROOT / module_file, class_name


def read_predictor(predictor_ref: str = DEFAULT_PREDICTOR) -> CogPredictor:
    path, class_name = split_ref(predictor_ref)
    return parse_predictor(path.read_text(), class_name)
