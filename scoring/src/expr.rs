//! The light-score expression language, evaluated on shards for every candidate.
//!
//! ```text
//! 2.0*quality + 0.3*ln(1 + saves) - age_hours/48 + (req.is_new_user > 0 ? 0.5*quality : 0)
//! ```
//!
//! - numbers, `+ - * / ^`, unary `-` and `!`, comparisons `< <= > >= == !=` (1 or 0),
//!   `&&`, `||`, the conditional `c ? a : b`;
//! - functions `ln`, `log` (= `ln`), `exp`, `sqrt`, `abs`, `min(..)`, `max(..)`,
//!   `pow(a, b)`, `clamp(x, lo, hi)`, `if(c, a, b)`;
//! - pin variables ([`PIN_VARIABLES`]) and request features `req.<name>` (bound per
//!   request; a feature the request does not send is 0).
//!
//! An expression is parsed and checked once ([`Expr::compile`]; errors carry line and
//! column) into stack bytecode with constants folded; evaluation allocates nothing.

use std::fmt;

/// Pin variables, in the order of the `vars` slice passed to [`Expr::eval`].
pub const PIN_VARIABLES: [&str; 6] = ["quality", "saves", "clicks", "closeups", "age_hours", "age_days"];

/// Longest expression source accepted.
pub const MAX_SOURCE_BYTES: usize = 4096;
const MAX_DEPTH: usize = 64;

/// A compile error, pointing at the offending character.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Const(f64),
    Var(u8),
    Req(u16),
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Neg,
    Not,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    And,
    Or,
    Ln,
    Exp,
    Sqrt,
    Abs,
    Min(u8),
    Max(u8),
    Clamp,
    Select,
}

/// A compiled expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    source: String,
    ops: Vec<Op>,
    request_features: Vec<String>,
    max_stack: usize,
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl Expr {
    /// Parses, checks and compiles `source`.
    pub fn compile(source: &str) -> Result<Expr, ParseError> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(ParseError {
                line: 1,
                column: 1,
                message: format!("expression longer than {MAX_SOURCE_BYTES} bytes"),
            });
        }
        let tokens = lex(source)?;
        let mut p = Parser { tokens, pos: 0, request_features: Vec::new(), depth: 0 };
        let ast = p.expr()?;
        if let Some(t) = p.tokens.get(p.pos)
            && t.kind != Tok::End
        {
            return Err(t.error(format!("unexpected {}", t.kind)));
        }
        let mut ops = Vec::new();
        emit(&ast, &mut ops);
        let max_stack = stack_depth(&ops);
        Ok(Expr { source: source.to_owned(), ops, request_features: p.request_features, max_stack })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The `req.<name>` features the expression reads, in the order [`Expr::eval`]
    /// expects their values.
    pub fn request_features(&self) -> &[String] {
        &self.request_features
    }

    /// Evaluates for one candidate. `vars` holds the [`PIN_VARIABLES`] in order, `req`
    /// the request features in [`Expr::request_features`] order (missing ones 0).
    /// `stack` is scratch space reused across calls. NaN scores become `-inf`.
    pub fn eval(&self, vars: &[f64; PIN_VARIABLES.len()], req: &[f64], stack: &mut Vec<f64>) -> f64 {
        stack.clear();
        stack.reserve(self.max_stack);
        for op in &self.ops {
            match *op {
                Op::Const(c) => stack.push(c),
                Op::Var(i) => stack.push(vars[i as usize]),
                Op::Req(i) => stack.push(req.get(i as usize).copied().unwrap_or(0.0)),
                Op::Neg => unary(stack, |a| -a),
                Op::Not => unary(stack, |a| bool_f(a == 0.0)),
                Op::Ln => unary(stack, f64::ln),
                Op::Exp => unary(stack, f64::exp),
                Op::Sqrt => unary(stack, f64::sqrt),
                Op::Abs => unary(stack, f64::abs),
                Op::Add => binary(stack, |a, b| a + b),
                Op::Sub => binary(stack, |a, b| a - b),
                Op::Mul => binary(stack, |a, b| a * b),
                Op::Div => binary(stack, |a, b| a / b),
                Op::Pow => binary(stack, f64::powf),
                Op::Lt => binary(stack, |a, b| bool_f(a < b)),
                Op::Le => binary(stack, |a, b| bool_f(a <= b)),
                Op::Gt => binary(stack, |a, b| bool_f(a > b)),
                Op::Ge => binary(stack, |a, b| bool_f(a >= b)),
                Op::Eq => binary(stack, |a, b| bool_f(a == b)),
                Op::Ne => binary(stack, |a, b| bool_f(a != b)),
                Op::And => binary(stack, |a, b| bool_f(a != 0.0 && b != 0.0)),
                Op::Or => binary(stack, |a, b| bool_f(a != 0.0 || b != 0.0)),
                Op::Min(n) => variadic(stack, n, f64::min),
                Op::Max(n) => variadic(stack, n, f64::max),
                Op::Clamp => {
                    let hi = stack.pop().unwrap_or(0.0);
                    let lo = stack.pop().unwrap_or(0.0);
                    let x = stack.pop().unwrap_or(0.0);
                    stack.push(x.max(lo).min(hi));
                }
                Op::Select => {
                    let b = stack.pop().unwrap_or(0.0);
                    let a = stack.pop().unwrap_or(0.0);
                    let c = stack.pop().unwrap_or(0.0);
                    stack.push(if c != 0.0 { a } else { b });
                }
            }
        }
        let v = stack.pop().unwrap_or(0.0);
        if v.is_nan() { f64::NEG_INFINITY } else { v }
    }
}

fn bool_f(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

fn unary(stack: &mut [f64], f: impl Fn(f64) -> f64) {
    if let Some(top) = stack.last_mut() {
        *top = f(*top);
    }
}

fn binary(stack: &mut Vec<f64>, f: impl Fn(f64, f64) -> f64) {
    let b = stack.pop().unwrap_or(0.0);
    if let Some(a) = stack.last_mut() {
        *a = f(*a, b);
    }
}

fn variadic(stack: &mut Vec<f64>, n: u8, f: impl Fn(f64, f64) -> f64) {
    let start = stack.len().saturating_sub(n as usize);
    let v = stack[start..].iter().copied().reduce(&f).unwrap_or(0.0);
    stack.truncate(start);
    stack.push(v);
}

fn stack_depth(ops: &[Op]) -> usize {
    let (mut depth, mut max) = (0isize, 0isize);
    for op in ops {
        depth += match op {
            Op::Const(_) | Op::Var(_) | Op::Req(_) => 1,
            Op::Neg | Op::Not | Op::Ln | Op::Exp | Op::Sqrt | Op::Abs => 0,
            Op::Min(n) | Op::Max(n) => 1 - *n as isize,
            Op::Clamp | Op::Select => -2,
            _ => -1,
        };
        max = max.max(depth);
    }
    max as usize
}

// ------------------------------------------------------------------ lexer

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(f64),
    Ident(String),
    Op(&'static str),
    LParen,
    RParen,
    Comma,
    Question,
    Colon,
    End,
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(n) => write!(f, "number {n}"),
            Tok::Ident(s) => write!(f, "`{s}`"),
            Tok::Op(o) => write!(f, "`{o}`"),
            Tok::LParen => f.write_str("`(`"),
            Tok::RParen => f.write_str("`)`"),
            Tok::Comma => f.write_str("`,`"),
            Tok::Question => f.write_str("`?`"),
            Tok::Colon => f.write_str("`:`"),
            Tok::End => f.write_str("end of expression"),
        }
    }
}

#[derive(Clone, Debug)]
struct Token {
    kind: Tok,
    line: usize,
    column: usize,
}

impl Token {
    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError { line: self.line, column: self.column, message: message.into() }
    }
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let chars: Vec<char> = src.chars().collect();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let mut out = Vec::new();
    while i < chars.len() {
        let c = chars[i];
        let (start_line, start_col) = (line, col);
        let push = |out: &mut Vec<Token>, kind| out.push(Token { kind, line: start_line, column: start_col });
        if c == '\n' {
            i += 1;
            line += 1;
            col = 1;
            continue;
        }
        if c.is_whitespace() {
            i += 1;
            col += 1;
            continue;
        }
        if c == '#' {
            // Comment to end of line.
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit())) {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.') {
                i += 1;
            }
            if i < chars.len() && (chars[i] == 'e' || chars[i] == 'E') {
                i += 1;
                if i < chars.len() && (chars[i] == '+' || chars[i] == '-') {
                    i += 1;
                }
                while i < chars.len() && chars[i].is_ascii_digit() {
                    i += 1;
                }
            }
            let text: String = chars[start..i].iter().collect();
            let n: f64 = text.parse().map_err(|_| ParseError {
                line: start_line,
                column: start_col,
                message: format!("bad number `{text}`"),
            })?;
            col += i - start;
            push(&mut out, Tok::Num(n));
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == '.')
            {
                i += 1;
            }
            col += i - start;
            push(&mut out, Tok::Ident(chars[start..i].iter().collect()));
            continue;
        }
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op2 = ["<=", ">=", "==", "!=", "&&", "||"].into_iter().find(|o| *o == two);
        if let Some(o) = op2 {
            i += 2;
            col += 2;
            push(&mut out, Tok::Op(o));
            continue;
        }
        let kind = match c {
            '+' => Tok::Op("+"),
            '-' => Tok::Op("-"),
            '*' => Tok::Op("*"),
            '/' => Tok::Op("/"),
            '^' => Tok::Op("^"),
            '<' => Tok::Op("<"),
            '>' => Tok::Op(">"),
            '!' => Tok::Op("!"),
            '(' => Tok::LParen,
            ')' => Tok::RParen,
            ',' => Tok::Comma,
            '?' => Tok::Question,
            ':' => Tok::Colon,
            other => {
                return Err(ParseError {
                    line,
                    column: col,
                    message: format!("unexpected character `{other}`"),
                });
            }
        };
        i += 1;
        col += 1;
        push(&mut out, kind);
    }
    out.push(Token { kind: Tok::End, line, column: col });
    Ok(out)
}

// ------------------------------------------------------------------ parser

#[derive(Clone, Debug)]
enum Ast {
    Const(f64),
    Var(u8),
    Req(u16),
    Unary(Op, Box<Ast>),
    Binary(Op, Box<Ast>, Box<Ast>),
    Call(Op, Vec<Ast>),
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    request_features: Vec<String>,
    depth: usize,
}

/// Binary operators by precedence level, lowest first.
const LEVELS: [&[(&str, Op)]; 5] = [
    &[("||", Op::Or)],
    &[("&&", Op::And)],
    &[("<", Op::Lt), ("<=", Op::Le), (">", Op::Gt), (">=", Op::Ge), ("==", Op::Eq), ("!=", Op::Ne)],
    &[("+", Op::Add), ("-", Op::Sub)],
    &[("*", Op::Mul), ("/", Op::Div)],
];

impl Parser {
    fn peek(&self) -> &Token {
        // `lex` always ends the stream with `End`, and `pos` never passes it.
        &self.tokens[self.pos.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> Token {
        let t = self.peek().clone();
        if t.kind != Tok::End {
            self.pos += 1;
        }
        t
    }

    fn expect(&mut self, kind: Tok) -> Result<(), ParseError> {
        let t = self.next();
        if t.kind == kind { Ok(()) } else { Err(t.error(format!("expected {kind}, found {}", t.kind))) }
    }

    fn expr(&mut self) -> Result<Ast, ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.peek().error("expression nested too deeply"));
        }
        let cond = self.level(0)?;
        let out = if self.peek().kind == Tok::Question {
            self.next();
            let a = self.expr()?;
            self.expect(Tok::Colon)?;
            let b = self.expr()?;
            Ast::Call(Op::Select, vec![cond, a, b])
        } else {
            cond
        };
        self.depth -= 1;
        Ok(out)
    }

    fn level(&mut self, n: usize) -> Result<Ast, ParseError> {
        if n == LEVELS.len() {
            return self.unary();
        }
        let mut lhs = self.level(n + 1)?;
        loop {
            let op = match &self.peek().kind {
                Tok::Op(o) => LEVELS[n].iter().find(|(s, _)| s == o).map(|(_, op)| *op),
                _ => None,
            };
            let Some(op) = op else { break };
            self.next();
            let rhs = self.level(n + 1)?;
            lhs = Ast::Binary(op, Box::new(lhs), Box::new(rhs));
            // Comparisons do not chain (`a < b < c` is almost always a mistake).
            if n == 2 {
                if let Tok::Op(o) = &self.peek().kind
                    && LEVELS[2].iter().any(|(s, _)| s == o)
                {
                    return Err(self.peek().error("comparisons cannot be chained; use &&"));
                }
                break;
            }
        }
        Ok(lhs)
    }

    fn unary(&mut self) -> Result<Ast, ParseError> {
        match self.peek().kind {
            Tok::Op("-") => {
                self.next();
                Ok(Ast::Unary(Op::Neg, Box::new(self.unary()?)))
            }
            Tok::Op("!") => {
                self.next();
                Ok(Ast::Unary(Op::Not, Box::new(self.unary()?)))
            }
            _ => {
                let base = self.primary()?;
                if self.peek().kind == Tok::Op("^") {
                    self.next();
                    let exp = self.unary()?;
                    return Ok(Ast::Binary(Op::Pow, Box::new(base), Box::new(exp)));
                }
                Ok(base)
            }
        }
    }

    fn primary(&mut self) -> Result<Ast, ParseError> {
        let t = self.next();
        match t.kind {
            Tok::Num(n) => Ok(Ast::Const(n)),
            Tok::LParen => {
                let e = self.expr()?;
                self.expect(Tok::RParen)?;
                Ok(e)
            }
            Tok::Ident(ref name) if self.peek().kind == Tok::LParen => {
                self.next();
                let mut args = Vec::new();
                if self.peek().kind != Tok::RParen {
                    loop {
                        args.push(self.expr()?);
                        if self.peek().kind == Tok::Comma {
                            self.next();
                        } else {
                            break;
                        }
                    }
                }
                self.expect(Tok::RParen)?;
                call(&t, name, args)
            }
            Tok::Ident(ref name) => {
                if let Some(feature) = name.strip_prefix("req.") {
                    if feature.is_empty() || feature.contains('.') {
                        return Err(t.error(format!("bad request feature name `{name}`")));
                    }
                    let idx = match self.request_features.iter().position(|f| f == feature) {
                        Some(i) => i,
                        None => {
                            self.request_features.push(feature.to_owned());
                            self.request_features.len() - 1
                        }
                    };
                    return Ok(Ast::Req(idx as u16));
                }
                match PIN_VARIABLES.iter().position(|v| v == name) {
                    Some(i) => Ok(Ast::Var(i as u8)),
                    None => Err(t.error(format!(
                        "unknown variable `{name}` (pin variables: {}; request features: req.<name>)",
                        PIN_VARIABLES.join(", ")
                    ))),
                }
            }
            ref other => Err(t.error(format!("expected a number, variable, function or `(`, found {other}"))),
        }
    }
}

fn call(t: &Token, name: &str, mut args: Vec<Ast>) -> Result<Ast, ParseError> {
    let arity = |n: usize| {
        if args.len() == n {
            Ok(())
        } else {
            Err(t.error(format!("`{name}` takes {n} argument(s), got {}", args.len())))
        }
    };
    let unary_fn = |op| -> Result<Ast, ParseError> { Ok(Ast::Unary(op, Box::new(args[0].clone()))) };
    match name {
        "ln" | "log" => arity(1).and_then(|_| unary_fn(Op::Ln)),
        "exp" => arity(1).and_then(|_| unary_fn(Op::Exp)),
        "sqrt" => arity(1).and_then(|_| unary_fn(Op::Sqrt)),
        "abs" => arity(1).and_then(|_| unary_fn(Op::Abs)),
        "pow" => {
            arity(2)?;
            let b = args.pop().unwrap_or(Ast::Const(0.0));
            let a = args.pop().unwrap_or(Ast::Const(0.0));
            Ok(Ast::Binary(Op::Pow, Box::new(a), Box::new(b)))
        }
        "clamp" => arity(3).map(|_| Ast::Call(Op::Clamp, args)),
        "if" => arity(3).map(|_| Ast::Call(Op::Select, args)),
        "min" | "max" => {
            if args.is_empty() || args.len() > 16 {
                return Err(t.error(format!("`{name}` takes 1 to 16 arguments, got {}", args.len())));
            }
            let n = args.len() as u8;
            Ok(Ast::Call(if name == "min" { Op::Min(n) } else { Op::Max(n) }, args))
        }
        other => Err(t.error(format!(
            "unknown function `{other}` (functions: ln, log, exp, sqrt, abs, pow, min, max, clamp, if)"
        ))),
    }
}

/// Emits bytecode, folding subtrees that are constant.
fn emit(ast: &Ast, ops: &mut Vec<Op>) {
    let start = ops.len();
    match ast {
        Ast::Const(c) => ops.push(Op::Const(*c)),
        Ast::Var(i) => ops.push(Op::Var(*i)),
        Ast::Req(i) => ops.push(Op::Req(*i)),
        Ast::Unary(op, a) => {
            emit(a, ops);
            ops.push(*op);
        }
        Ast::Binary(op, a, b) => {
            emit(a, ops);
            emit(b, ops);
            ops.push(*op);
        }
        Ast::Call(op, args) => {
            for a in args {
                emit(a, ops);
            }
            ops.push(*op);
        }
    }
    let tail = &ops[start..];
    let constant = tail.len() > 1 && tail.iter().all(|o| !matches!(o, Op::Var(_) | Op::Req(_)));
    if constant {
        let folded =
            Expr { source: String::new(), ops: tail.to_vec(), request_features: vec![], max_stack: 0 }.eval(
                &[0.0; PIN_VARIABLES.len()],
                &[],
                &mut Vec::new(),
            );
        ops.truncate(start);
        ops.push(Op::Const(folded));
    }
}

// ------------------------------------------------------------------ bounds

/// A closed range of values a variable takes over a set of candidates (both ends
/// finite, `lo <= hi`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Interval {
    pub lo: f64,
    pub hi: f64,
}

impl Interval {
    /// The range `[lo, hi]`, or `None` unless both ends are finite and ordered.
    pub fn new(lo: f64, hi: f64) -> Option<Interval> {
        (lo.is_finite() && hi.is_finite() && lo <= hi).then_some(Interval { lo, hi })
    }

    pub fn point(v: f64) -> Option<Interval> {
        Interval::new(v, v)
    }
}

/// Scratch space of [`Expr::upper_bound`], reused across calls.
#[derive(Clone, Debug, Default)]
pub struct BoundScratch(Vec<Range>);

/// What the bound evaluator knows of an intermediate value: a finite range, or nothing
/// (it may be infinite or NaN). Every step over-approximates, so the end result holds
/// every value [`Expr::eval`] can produce for inputs inside the given ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Range {
    Known(Interval),
    Unknown,
}

impl Range {
    fn of(lo: f64, hi: f64) -> Range {
        Interval::new(lo, hi).map_or(Range::Unknown, Range::Known)
    }

    /// The hull of `values` (all finite, or `Unknown`).
    fn hull(values: &[f64]) -> Range {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if values.iter().any(|v| !v.is_finite()) { Range::Unknown } else { Range::of(lo, hi) }
    }

    const BOOL: Range = Range::Known(Interval { lo: 0.0, hi: 1.0 });

    fn truth(b: bool) -> Range {
        let v = bool_f(b);
        Range::Known(Interval { lo: v, hi: v })
    }

    /// Certainly non-zero (`Some(true)`), certainly zero (`Some(false)`), or either.
    fn nonzero(self) -> Option<bool> {
        match self {
            Range::Known(i) if i.lo > 0.0 || i.hi < 0.0 => Some(true),
            Range::Known(i) if i.lo == 0.0 && i.hi == 0.0 => Some(false),
            _ => None,
        }
    }
}

fn unknown_or(a: Range, b: Range, f: impl Fn(Interval, Interval) -> Range) -> Range {
    match (a, b) {
        (Range::Known(a), Range::Known(b)) => f(a, b),
        _ => Range::Unknown,
    }
}

/// A comparison: certain when the ranges do not overlap in the way that matters.
fn compare(a: Range, b: Range, certainly: impl Fn(Interval, Interval) -> Option<bool>) -> Range {
    match (a, b) {
        (Range::Known(a), Range::Known(b)) => certainly(a, b).map_or(Range::BOOL, Range::truth),
        _ => Range::BOOL,
    }
}

impl Expr {
    /// An upper bound of [`Expr::eval`] over every candidate whose pin variables lie in
    /// `vars` (one range per [`PIN_VARIABLES`] entry), with the request features `req`;
    /// `+inf` when the expression can be unbounded or NaN over those ranges (nothing can
    /// be skipped then). Sound by construction: each step returns a range holding every
    /// value the step can produce, and IEEE rounding is monotone, so the bound computed
    /// from range ends is at least the score computed from values inside them. Used by
    /// shards to skip blocks of candidates that cannot make the top-K.
    pub fn upper_bound(
        &self,
        vars: &[Interval; PIN_VARIABLES.len()],
        req: &[f64],
        scratch: &mut BoundScratch,
    ) -> f64 {
        let stack = &mut scratch.0;
        stack.clear();
        for op in &self.ops {
            let r = match *op {
                Op::Const(c) => Range::of(c, c),
                Op::Var(i) => vars.get(i as usize).map_or(Range::Unknown, |v| Range::Known(*v)),
                Op::Req(i) => {
                    let v = req.get(i as usize).copied().unwrap_or(0.0);
                    Range::of(v, v)
                }
                Op::Neg | Op::Not | Op::Ln | Op::Exp | Op::Sqrt | Op::Abs => {
                    let a = stack.pop().unwrap_or(Range::Unknown);
                    bound_unary(*op, a)
                }
                Op::Min(n) | Op::Max(n) => {
                    let start = stack.len().saturating_sub(n as usize);
                    let args: Vec<Range> = stack.drain(start..).collect();
                    let known: Option<Vec<Interval>> =
                        args.iter().map(|a| if let Range::Known(i) = a { Some(*i) } else { None }).collect();
                    match known {
                        Some(v) if !v.is_empty() => {
                            let (los, his): (Vec<f64>, Vec<f64>) = v.iter().map(|i| (i.lo, i.hi)).unzip();
                            let pick = |xs: &[f64]| {
                                let f = if matches!(op, Op::Min(_)) { f64::min } else { f64::max };
                                xs.iter().copied().reduce(f).unwrap_or(0.0)
                            };
                            Range::of(pick(&los), pick(&his))
                        }
                        _ => Range::Unknown,
                    }
                }
                Op::Clamp => {
                    let hi = stack.pop().unwrap_or(Range::Unknown);
                    let lo = stack.pop().unwrap_or(Range::Unknown);
                    let x = stack.pop().unwrap_or(Range::Unknown);
                    // x.max(lo).min(hi), step by step.
                    let m = unknown_or(x, lo, |x, lo| Range::of(x.lo.max(lo.lo), x.hi.max(lo.hi)));
                    unknown_or(m, hi, |m, hi| Range::of(m.lo.min(hi.lo), m.hi.min(hi.hi)))
                }
                Op::Select => {
                    let b = stack.pop().unwrap_or(Range::Unknown);
                    let a = stack.pop().unwrap_or(Range::Unknown);
                    let c = stack.pop().unwrap_or(Range::Unknown);
                    match c.nonzero() {
                        Some(true) => a,
                        Some(false) => b,
                        None => unknown_or(a, b, |a, b| Range::of(a.lo.min(b.lo), a.hi.max(b.hi))),
                    }
                }
                _ => {
                    let b = stack.pop().unwrap_or(Range::Unknown);
                    let a = stack.pop().unwrap_or(Range::Unknown);
                    bound_binary(*op, a, b)
                }
            };
            stack.push(r);
        }
        match stack.pop() {
            // A NaN score is -inf (below any bound); an infinite one is `Unknown`. The
            // pad covers libm's `ln`/`exp`/`powf`, which are not guaranteed monotone to
            // the last bit.
            Some(Range::Known(i)) => i.hi + i.hi.abs() * 1e-9 + 1e-12,
            _ => f64::INFINITY,
        }
    }
}

fn bound_unary(op: Op, a: Range) -> Range {
    if op == Op::Not {
        return match a.nonzero() {
            Some(nz) => Range::truth(!nz),
            None => Range::BOOL,
        };
    }
    let Range::Known(a) = a else { return Range::Unknown };
    match op {
        Op::Neg => Range::of(-a.hi, -a.lo),
        // Below 0: NaN; at 0: -inf.
        Op::Ln if a.lo > 0.0 => Range::of(a.lo.ln(), a.hi.ln()),
        Op::Exp => Range::of(a.lo.exp(), a.hi.exp()),
        Op::Sqrt if a.lo >= 0.0 => Range::of(a.lo.sqrt(), a.hi.sqrt()),
        Op::Abs if a.lo >= 0.0 => Range::Known(a),
        Op::Abs if a.hi <= 0.0 => Range::of(-a.hi, -a.lo),
        Op::Abs => Range::of(0.0, a.hi.max(-a.lo)),
        _ => Range::Unknown,
    }
}

fn bound_binary(op: Op, a: Range, b: Range) -> Range {
    match op {
        Op::Add => unknown_or(a, b, |a, b| Range::of(a.lo + b.lo, a.hi + b.hi)),
        Op::Sub => unknown_or(a, b, |a, b| Range::of(a.lo - b.hi, a.hi - b.lo)),
        Op::Mul => {
            unknown_or(a, b, |a, b| Range::hull(&[a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi]))
        }
        // A divisor range holding 0 can divide by 0 (infinite, or NaN for 0/0).
        Op::Div => unknown_or(a, b, |a, b| {
            if b.lo <= 0.0 && b.hi >= 0.0 {
                Range::Unknown
            } else {
                Range::hull(&[a.lo / b.lo, a.lo / b.hi, a.hi / b.lo, a.hi / b.hi])
            }
        }),
        // x^y for x > 0 is exp(y·ln x): y·ln x is bilinear, so its extremes over a box
        // are at the corners, and exp is monotone. Other bases can be NaN or infinite.
        Op::Pow => unknown_or(a, b, |a, b| {
            if a.lo > 0.0 {
                Range::hull(&[a.lo.powf(b.lo), a.lo.powf(b.hi), a.hi.powf(b.lo), a.hi.powf(b.hi)])
            } else {
                Range::Unknown
            }
        }),
        Op::Lt => {
            compare(a, b, |a, b| if a.hi < b.lo { Some(true) } else { (a.lo >= b.hi).then_some(false) })
        }
        Op::Le => {
            compare(a, b, |a, b| if a.hi <= b.lo { Some(true) } else { (a.lo > b.hi).then_some(false) })
        }
        Op::Gt => {
            compare(a, b, |a, b| if a.lo > b.hi { Some(true) } else { (a.hi <= b.lo).then_some(false) })
        }
        Op::Ge => {
            compare(a, b, |a, b| if a.lo >= b.hi { Some(true) } else { (a.hi < b.lo).then_some(false) })
        }
        Op::Eq | Op::Ne => {
            let eq = match (a, b) {
                (Range::Known(a), Range::Known(b)) if a.hi < b.lo || b.hi < a.lo => Some(false),
                (Range::Known(a), Range::Known(b)) if a.lo == a.hi && b.lo == b.hi && a.lo == b.lo => {
                    Some(true)
                }
                _ => None,
            };
            match eq {
                Some(e) => Range::truth(if op == Op::Eq { e } else { !e }),
                None => Range::BOOL,
            }
        }
        Op::And => match (a.nonzero(), b.nonzero()) {
            (Some(false), _) | (_, Some(false)) => Range::truth(false),
            (Some(true), Some(true)) => Range::truth(true),
            _ => Range::BOOL,
        },
        Op::Or => match (a.nonzero(), b.nonzero()) {
            (Some(true), _) | (_, Some(true)) => Range::truth(true),
            (Some(false), Some(false)) => Range::truth(false),
            _ => Range::BOOL,
        },
        _ => Range::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(quality: f64, saves: f64, age_hours: f64) -> [f64; PIN_VARIABLES.len()] {
        [quality, saves, 0.0, 0.0, age_hours, age_hours / 24.0]
    }

    fn eval(src: &str, v: [f64; PIN_VARIABLES.len()], req: &[f64]) -> f64 {
        Expr::compile(src).unwrap().eval(&v, req, &mut Vec::new())
    }

    #[test]
    fn evaluates_the_default_expression() {
        let got = eval("2.0*quality + 0.3*ln(1+saves) - age_hours/48", vars(0.5, 9.0, 24.0), &[]);
        let want = 2.0 * 0.5 + 0.3 * 10f64.ln() - 0.5;
        assert!((got - want).abs() < 1e-12);
    }

    #[test]
    fn precedence_and_associativity() {
        let v = vars(0.0, 0.0, 0.0);
        assert_eq!(eval("1 + 2 * 3", v, &[]), 7.0);
        assert_eq!(eval("(1 + 2) * 3", v, &[]), 9.0);
        assert_eq!(eval("8 - 3 - 2", v, &[]), 3.0);
        assert_eq!(eval("2 ^ 3 ^ 2", v, &[]), 512.0);
        assert_eq!(eval("-2 ^ 2", v, &[]), -4.0);
        assert_eq!(eval("1 < 2 && 2 < 1 || 3 >= 3", v, &[]), 1.0);
        assert_eq!(eval("!0 + !5", v, &[]), 1.0);
        assert_eq!(eval("1 > 2 ? 10 : 2 > 1 ? 20 : 30", v, &[]), 20.0);
    }

    #[test]
    fn functions_and_request_features() {
        let e = Expr::compile(
            "max(quality, req.boost, 0.1) + min(3, saves) + clamp(req.x, 0, 1) + if(req.boost > 1, 100, 0)",
        )
        .unwrap();
        assert_eq!(e.request_features(), ["boost", "x"]);
        let got = e.eval(&vars(0.2, 7.0, 0.0), &[0.5, 5.0], &mut Vec::new());
        assert_eq!(got, 0.5 + 3.0 + 1.0);
        // Missing request features read as 0.
        assert_eq!(e.eval(&vars(0.2, 7.0, 0.0), &[], &mut Vec::new()), 0.2 + 3.0);
        assert_eq!(eval("pow(2, 10) + abs(-1) + sqrt(16) + exp(0)", vars(0.0, 0.0, 0.0), &[]), 1030.0);
    }

    #[test]
    fn constants_are_folded() {
        let e = Expr::compile("quality * (2 + 3 * 4) + ln(exp(1))").unwrap();
        assert_eq!(e.ops, [Op::Var(0), Op::Const(14.0), Op::Mul, Op::Const(1.0), Op::Add]);
        assert_eq!(e.eval(&vars(1.0, 0.0, 0.0), &[], &mut Vec::new()), 15.0);
    }

    #[test]
    fn upper_bounds_of_the_demo_rankings_are_tight() {
        let iv = |lo: f64, hi: f64| Interval::new(lo, hi).unwrap();
        let vars = [iv(0.2, 0.9), iv(0.0, 99.0), iv(0.0, 10.0), iv(0.0, 10.0), iv(24.0, 48.0), iv(1.0, 2.0)];
        let e = Expr::compile("2*quality + 0.3*ln(1 + saves) - age_hours/48").unwrap();
        let b = e.upper_bound(&vars, &[], &mut BoundScratch::default());
        let want = 1.8 + 0.3 * 100f64.ln() - 0.5;
        assert!(b >= want && b - want < 1e-6, "{b} vs {want}");
        let recent = Expr::compile("-age_hours").unwrap();
        assert!((recent.upper_bound(&vars, &[], &mut BoundScratch::default()) + 24.0).abs() < 1e-6);
        // Unbounded or NaN-capable expressions bound nothing.
        for src in ["ln(saves)", "quality / (saves - 1)", "exp(1000 * quality)", "ln(-1)"] {
            let e = Expr::compile(src).unwrap();
            assert_eq!(e.upper_bound(&vars, &[], &mut BoundScratch::default()), f64::INFINITY, "{src}");
        }
        // Conditions decided by the ranges pick their branch.
        let e = Expr::compile("req.x > 0 ? quality : 100").unwrap();
        assert!(e.upper_bound(&vars, &[1.0], &mut BoundScratch::default()) < 1.0);
        assert!(e.upper_bound(&vars, &[0.0], &mut BoundScratch::default()) >= 100.0);
    }

    #[test]
    fn nan_scores_sort_last() {
        assert_eq!(eval("ln(-1)", vars(0.0, 0.0, 0.0), &[]), f64::NEG_INFINITY);
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let err = Expr::compile("2*quality +\n  0.3*ln(1+savez)").unwrap_err();
        assert_eq!((err.line, err.column), (2, 12));
        assert!(err.message.contains("unknown variable `savez`"), "{err}");
        let err = Expr::compile("ln(1, 2)").unwrap_err();
        assert_eq!((err.line, err.column), (1, 1));
        let err = Expr::compile("(quality + 1").unwrap_err();
        assert!(err.message.contains("expected `)`"), "{err}");
        assert_eq!(err.column, 13);
        assert!(Expr::compile("quality $ 2").unwrap_err().message.contains("unexpected character"));
        assert!(Expr::compile("1 < 2 < 3").unwrap_err().message.contains("chained"));
        assert!(Expr::compile("foo(1)").unwrap_err().message.contains("unknown function"));
        assert!(Expr::compile("").is_err());
        assert!(Expr::compile("1 2").is_err());
        assert!(Expr::compile(&"(".repeat(100)).unwrap_err().message.contains("deeply"));
    }

    #[test]
    fn comments_and_whitespace() {
        assert_eq!(eval("# weights\n2 * quality # quality\n+ 1", vars(0.5, 0.0, 0.0), &[]), 2.0);
    }

    fn range_strategy() -> impl proptest::strategy::Strategy<Value = (f64, f64)> {
        use proptest::prelude::*;
        (-50.0f64..50.0, 0.0f64..20.0).prop_map(|(lo, w)| (lo, lo + w))
    }

    proptest::proptest! {
        /// The bound holds every score of candidates inside the ranges, for random
        /// expressions over every operator.
        #[test]
        fn upper_bound_holds_every_score(
            src in "(quality|saves|age_hours|req.a|1|2|0|-|[-+*/^<>]|ln|exp|sqrt|abs|min|max|clamp|pow|if|[(),?:]| ){1,30}",
            ranges in proptest::collection::vec(range_strategy(), 6),
            picks in proptest::collection::vec(0.0f64..=1.0, 6),
            req in -3.0f64..3.0,
        ) {
            let Ok(e) = Expr::compile(&src) else { return Ok(()) };
            let iv: Vec<Interval> = ranges.iter().map(|(lo, hi)| Interval::new(*lo, *hi).unwrap()).collect();
            let vars_iv: [Interval; PIN_VARIABLES.len()] = iv.clone().try_into().unwrap();
            let bound = e.upper_bound(&vars_iv, &[req], &mut BoundScratch::default());
            let mut point = [0.0; PIN_VARIABLES.len()];
            for (k, (i, t)) in iv.iter().zip(&picks).enumerate() {
                point[k] = if *t < 0.1 { i.lo } else if *t > 0.9 { i.hi } else { i.lo + (i.hi - i.lo) * t };
            }
            let score = e.eval(&point, &[req], &mut Vec::new());
            proptest::prop_assert!(score <= bound, "{src}: score {score} > bound {bound} at {point:?}");
        }

        /// Any input either compiles or fails with a position inside the source; no
        /// panic, and compiled expressions evaluate without panicking.
        #[test]
        fn never_panics(src in "[-+*/^()<>=!&|?:,. 0-9a-z_]{0,40}") {
            match Expr::compile(&src) {
                Ok(e) => { let _ = e.eval(&vars(0.5, 3.0, 2.0), &[1.0, 2.0], &mut Vec::new()); }
                Err(err) => {
                    proptest::prop_assert!(err.line >= 1 && err.column >= 1);
                    proptest::prop_assert!(err.column <= src.len() + 1);
                }
            }
        }
    }
}
