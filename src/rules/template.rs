//! Values in actions are Jinja templates (minijinja, strict undefined).
//!
//! Each string leaf of an action's value tree is compiled once, when the
//! rules are loaded, so a syntax error is a load error. A leaf that is one
//! expression and nothing else (`"{{ payload.version }}"`) keeps the
//! expression's type (a number stays a number, a list a list); any other
//! template renders to a string. A missing field is an error for that event
//! (`UndefinedBehavior::Strict`), never a silent empty string; `default`
//! and `is defined` work as in Jinja.

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};
use serde_json::{Map, Value as Json};

/// A compiled value tree.
#[derive(Debug, Clone)]
pub enum Tmpl {
    /// No template inside: used as is.
    Literal(Json),
    /// A template rendering to a string, by its name in the environment.
    Text(String),
    /// A single expression, evaluated to a value of its own type.
    Expr(String),
    /// A list of templates.
    List(Vec<Tmpl>),
    /// A map whose values are templates (keys are literal).
    Map(Vec<(String, Tmpl)>),
}

impl Tmpl {
    /// True when the value holds no template (the same for every event).
    pub fn is_literal(&self) -> bool {
        matches!(self, Self::Literal(_))
    }
}

/// A template that failed to compile, with where it sits in the value.
#[derive(Debug)]
pub struct CompileError {
    /// Dotted path inside the value, e.g. `pillar.version`, `arg[0]`.
    pub path: String,
    /// The offending source text.
    pub source: String,
    /// minijinja's message.
    pub message: String,
}

/// All templates of one rule set, in one environment.
pub struct Templates {
    env: Environment<'static>,
    next: usize,
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Templates")
            .field("count", &self.next)
            .finish()
    }
}

impl Default for Templates {
    fn default() -> Self {
        Self::new()
    }
}

fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

/// The inner expression when `s` is exactly one `{{ … }}` and nothing else.
fn sole_expression(s: &str) -> Option<&str> {
    let inner = s.trim().strip_prefix("{{")?.strip_suffix("}}")?;
    let inner = inner.strip_prefix('-').unwrap_or(inner);
    let inner = inner.strip_suffix('-').unwrap_or(inner);
    if inner.contains("{{") || inner.contains("}}") || inner.contains("{%") {
        return None;
    }
    Some(inner.trim())
}

impl Templates {
    /// An empty set: strict undefined, no auto-escaping.
    pub fn new() -> Self {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_keep_trailing_newline(true);
        Self { env, next: 0 }
    }

    /// Compiles one string.
    pub fn compile_str(&mut self, s: &str) -> Result<Tmpl, String> {
        if !is_template(s) {
            return Ok(Tmpl::Literal(Json::String(s.to_owned())));
        }
        if let Some(expr) = sole_expression(s) {
            if self.env.compile_expression(expr).is_ok() {
                return Ok(Tmpl::Expr(expr.to_owned()));
            }
        }
        let name = format!("t{}", self.next);
        self.next += 1;
        self.env
            .add_template_owned(name.clone(), s.to_owned())
            .map_err(|e| describe(&e))?;
        Ok(Tmpl::Text(name))
    }

    /// Compiles every string leaf of a value (map keys stay literal).
    pub fn compile_value(&mut self, v: &Json) -> Result<Tmpl, CompileError> {
        self.compile_at(v, String::new())
    }

    fn compile_at(&mut self, v: &Json, path: String) -> Result<Tmpl, CompileError> {
        let t = match v {
            Json::String(s) => self.compile_str(s).map_err(|message| CompileError {
                path: path.clone(),
                source: s.clone(),
                message,
            })?,
            Json::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    out.push(self.compile_at(item, format!("{path}[{i}]"))?);
                }
                if out.iter().all(Tmpl::is_literal) {
                    Tmpl::Literal(v.clone())
                } else {
                    Tmpl::List(out)
                }
            }
            Json::Object(map) => {
                let mut out = Vec::with_capacity(map.len());
                for (k, item) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.push((k.clone(), self.compile_at(item, p)?));
                }
                if out.iter().all(|(_, t)| t.is_literal()) {
                    Tmpl::Literal(v.clone())
                } else {
                    Tmpl::Map(out)
                }
            }
            other => Tmpl::Literal(other.clone()),
        };
        Ok(t)
    }

    /// Renders a compiled value with `ctx` (`tag`, `data`, `sender`, `payload`).
    pub fn render(&self, t: &Tmpl, ctx: &Value) -> Result<Json, String> {
        self.render_at(t, ctx, "")
    }

    fn render_at(&self, t: &Tmpl, ctx: &Value, path: &str) -> Result<Json, String> {
        let at = |e: String| {
            if path.is_empty() {
                e
            } else {
                format!("{path}: {e}")
            }
        };
        Ok(match t {
            Tmpl::Literal(v) => v.clone(),
            Tmpl::Text(name) => {
                let tmpl = self.env.get_template(name).map_err(|e| at(describe(&e)))?;
                Json::String(tmpl.render(ctx).map_err(|e| at(describe(&e)))?)
            }
            Tmpl::Expr(src) => {
                let expr = self
                    .env
                    .compile_expression(src)
                    .map_err(|e| at(describe(&e)))?;
                let v = expr.eval(ctx).map_err(|e| at(describe(&e)))?;
                if v.is_undefined() {
                    return Err(at(format!("undefined value: {{{{ {src} }}}}")));
                }
                serde_json::to_value(&v).map_err(|e| at(format!("{{{{ {src} }}}}: {e}")))?
            }
            Tmpl::List(items) => Json::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| self.render_at(item, ctx, &format!("{path}[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            Tmpl::Map(entries) => {
                let mut m = Map::with_capacity(entries.len());
                for (k, item) in entries {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    m.insert(k.clone(), self.render_at(item, ctx, &p)?);
                }
                Json::Object(m)
            }
        })
    }
}

/// minijinja's error with its detail, on one line, without our internal
/// template names.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.kind().to_string();
    if let Some(detail) = e.detail() {
        s.push_str(": ");
        s.push_str(detail);
    }
    if let Some(line) = e.line() {
        if line > 1 {
            s.push_str(&format!(" (template line {line})"));
        }
    }
    s
}

/// The template context of an event: `tag`, `data` (as Salt delivers it),
/// `sender` (the minion id, or none), `payload` (the user's map).
pub fn context(tag: &str, data: &Json, sender: Option<&str>, payload: &Json) -> Value {
    minijinja::context! {
        tag => tag,
        data => Value::from_serialize(data),
        sender => sender,
        payload => Value::from_serialize(payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx() -> Value {
        context(
            "myapp/deploy",
            &json!({"id": "web1", "cmd": "_minion_event", "data": {"version": "1.2", "n": 3, "l": [1, 2]}}),
            Some("web1"),
            &json!({"version": "1.2", "n": 3, "l": [1, 2]}),
        )
    }

    #[test]
    fn sole_expressions_keep_their_type_others_render_to_text() {
        let mut t = Templates::new();
        let v = t
            .compile_value(&json!({
                "target": "{{ sender }}",
                "n": "{{ payload.n }}",
                "l": "{{ payload.l }}",
                "text": "v{{ payload.version }} on {{ data.id | upper }}",
                "plain": "no template",
                "num": 5,
            }))
            .unwrap();
        let out = t.render(&v, &ctx()).unwrap();
        assert_eq!(
            out,
            json!({"target": "web1", "n": 3, "l": [1, 2], "text": "v1.2 on WEB1",
                   "plain": "no template", "num": 5})
        );
    }

    #[test]
    fn a_missing_field_is_an_error_not_an_empty_string() {
        let mut t = Templates::new();
        for src in [
            "{{ payload.missing }}",
            "x{{ payload.missing }}",
            "{{ payload.missing.deeper }}",
        ] {
            let v = t.compile_value(&json!({"k": src})).unwrap();
            let err = t.render(&v, &ctx()).unwrap_err();
            assert!(err.starts_with("k: "), "{err}");
            assert!(err.contains("undefined"), "{src}: {err}");
        }
        // default() still works
        let v = t
            .compile_value(&json!("{{ payload.missing | default('none') }}"))
            .unwrap();
        assert_eq!(t.render(&v, &ctx()).unwrap(), json!("none"));
    }

    #[test]
    fn syntax_errors_name_the_path() {
        let mut t = Templates::new();
        let err = t
            .compile_value(&json!({"pillar": {"v": "{{ payload.version "}}))
            .unwrap_err();
        assert_eq!(err.path, "pillar.v");
        assert!(err.message.contains("syntax error"), "{}", err.message);
        let err = t.compile_value(&json!(["ok", "{% if %}"])).unwrap_err();
        assert_eq!(err.path, "[1]");
    }

    #[test]
    fn literals_stay_literal() {
        let mut t = Templates::new();
        assert!(t
            .compile_value(&json!({"a": [1, "b"]}))
            .unwrap()
            .is_literal());
    }
}
