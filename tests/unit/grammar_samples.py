"""Grammars (EBNF / GBNF) for guided_grammar's tests and benchmark, each with a sentence."""

JSON = r"""
# any JSON value, objects and arrays nested
root   ::= value
value  ::= object | array | string | number | ("true" | "false" | "null")
object ::= "{" ws ( member ( "," ws member )* )? "}" ws
member ::= string ":" ws value
array  ::= "[" ws ( value ( "," ws value )* )? "]" ws
string ::= "\"" ( [^"\\\x00-\x1f] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\"" ws
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )? ws
ws     ::= [ \t\n]{0,8}
"""
JSON_TEXT = '{"name": "Félix \\"the cat\\"", "age": 2.5, "colors": ["black", "white"], ' \
    '"indoor": true, "toys": [{"kind": "ball", "count": 3}, []]}'  # fmt: skip

ARITHMETIC = r"""
root   ::= expr
expr   ::= expr ("+" | "-") term | term     # left-recursive, as written in textbooks
term   ::= term ("*" | "/") factor | factor
factor ::= number | "(" expr ")" | "-" factor
number ::= [0-9]+ ("." [0-9]+)?
"""
ARITHMETIC_TEXT = "(12+3.5)*-(4-2)/7+((1))*100-2*3"

SQL = r"""
root      ::= select ";"
select    ::= "SELECT " columns " FROM " name where? order? limit?
columns   ::= "*" | column (", " column)*
column    ::= name | func "(" (name | "*") ")" (" AS " name)?
func      ::= "COUNT" | "SUM" | "AVG" | "MIN" | "MAX"
where     ::= " WHERE " condition ((" AND " | " OR ") condition)*
condition ::= name " " op " " literal | name " IS " "NOT "? "NULL"
op        ::= "=" | "!=" | "<" | "<=" | ">" | ">=" | "LIKE"
literal   ::= [0-9]+ | "'" [^'\n]* "'"
order     ::= " ORDER BY " name (" ASC" | " DESC")?
limit     ::= " LIMIT " [1-9] [0-9]{0,5}
name      ::= [a-z_] [a-z0-9_]{0,30}
"""
SQL_TEXT = (
    "SELECT name, COUNT(*) AS n FROM users WHERE age >= 18 AND city = 'Paris' OR "
    "email IS NOT NULL ORDER BY name DESC LIMIT 10;"
)

SAMPLES = {
    "json": (JSON, JSON_TEXT),
    "arithmetic": (ARITHMETIC, ARITHMETIC_TEXT),
    "sql": (SQL, SQL_TEXT),
}
