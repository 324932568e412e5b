//! The SRV name asked for a service: a template with `{service}` and `{domain}`.

use hickory_resolver::Name;
use waypost_core::{Error, Field, Problem, ServiceName, ValidationError};

use crate::config::config_error;

const SERVICE: &str = "{service}";
const DOMAIN: &str = "{domain}";
/// The longest label DNS allows (RFC 1035).
const LABEL_MAX: usize = 63;
/// The longest name, in presentation form without the final dot (RFC 1035).
const NAME_MAX: usize = 253;

/// A validated template with the domain filled in; renders fully qualified names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Template {
    /// The template with `{domain}` replaced, without a final dot.
    text: String,
    domain: String,
}

impl Template {
    pub(crate) fn new(template: &str, domain: &str) -> Result<Template, Error> {
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        check_name(domain).map_err(|why| {
            config_error(format!(
                "the domain {domain:?} is not a DNS name: {why} (DnsBuilder::domain)"
            ))
        })?;
        if !template.contains(SERVICE) {
            return Err(config_error(format!(
                "the name template {template:?} has no {SERVICE}; without it every service would \
                 ask the same name (DnsBuilder::name_template, e.g. \"_{{service}}._tcp.{{domain}}\")"
            )));
        }
        let filled = template.replace(DOMAIN, domain);
        let filled = filled.strip_suffix('.').unwrap_or(&filled);
        let rest = filled.replace(SERVICE, "");
        if rest.contains(['{', '}']) {
            return Err(config_error(format!(
                "the name template {template:?} has a placeholder other than {SERVICE} and \
                 {DOMAIN} (DnsBuilder::name_template)"
            )));
        }
        check_name(&filled.replace(SERVICE, "s")).map_err(|why| {
            config_error(format!(
                "the name template {template:?} does not make DNS names: {why} \
                 (DnsBuilder::name_template)"
            ))
        })?;
        Ok(Template {
            text: filled.to_owned(),
            domain: domain.to_owned(),
        })
    }

    /// The domain, without a final dot.
    pub(crate) fn domain(&self) -> &str {
        &self.domain
    }

    /// The fully qualified SRV name of `service`. A service name that DNS cannot carry (a label
    /// over 63 bytes, an empty label from `..`) is an [`Error::Invalid`] for the service name.
    pub(crate) fn render(&self, service: &ServiceName) -> Result<Name, Error> {
        let text = self.text.replace(SERVICE, service.as_str());
        let invalid = |why: String| {
            Error::Invalid(ValidationError::new(
                Field::ServiceName,
                Problem::Invalid(format!(
                    "{service:?} cannot be asked for over DNS as {text:?}: {why}"
                )),
            ))
        };
        check_name(&text).map_err(invalid)?;
        let mut name = Name::from_ascii(&text).map_err(|e| invalid(e.to_string()))?;
        name.set_fqdn(true);
        Ok(name)
    }
}

/// Checks a name in presentation form (no final dot): 1 to 253 bytes of labels of 1 to 63
/// ASCII letters, digits, `-` or `_`.
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".to_owned());
    }
    if name.len() > NAME_MAX {
        return Err(format!(
            "it is {} bytes long, the limit is {NAME_MAX}",
            name.len()
        ));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (two dots in a row, or a leading dot)".to_owned());
        }
        if label.len() > LABEL_MAX {
            return Err(format!(
                "the label {label:?} is {} bytes long, the limit is {LABEL_MAX}",
                label.len()
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
        {
            return Err(format!(
                "{c:?} is not allowed (ASCII letters, digits, '-', '_' and dots between labels)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(s: &str) -> ServiceName {
        ServiceName::new(s).expect("a valid service name")
    }

    #[test]
    fn renders_fully_qualified_names() {
        let t = Template::new("{service}.service.{domain}", "consul").unwrap();
        assert_eq!(
            t.render(&svc("users")).unwrap().to_ascii(),
            "users.service.consul."
        );
        let t = Template::new("_{service}._tcp.{domain}.", "example.com.").unwrap();
        assert_eq!(
            t.render(&svc("http")).unwrap().to_ascii(),
            "_http._tcp.example.com."
        );
        // A template without {domain} is a fixed zone.
        let t = Template::new("{service}.svc.cluster.local", "ignored").unwrap();
        assert_eq!(
            t.render(&svc("api")).unwrap().to_ascii(),
            "api.svc.cluster.local."
        );
        assert_eq!(t.domain(), "ignored");
        // Dots in a service name make labels.
        let t = Template::new("{service}.{domain}", "consul").unwrap();
        assert_eq!(
            t.render(&svc("v1.users")).unwrap().to_ascii(),
            "v1.users.consul."
        );
    }

    #[test]
    fn bad_templates_and_domains_are_config_errors() {
        for (template, domain, says) in [
            ("{service}.service.{domain}", "", "empty"),
            ("{service}.service.{domain}", "a b", "not allowed"),
            ("{service}.service.{domain}", "a..b", "empty label"),
            ("{service}.service.{domain}", &"x".repeat(64), "63"),
            ("users.service.{domain}", "consul", "no {service}"),
            ("{service}.{dc}.{domain}", "consul", "placeholder"),
            ("{service}..{domain}", "consul", "empty label"),
            ("{service}.service/{domain}", "consul", "not allowed"),
        ] {
            match Template::new(template, domain) {
                Ok(t) => panic!("{template:?} / {domain:?} accepted as {t:?}"),
                Err(e) => {
                    assert!(matches!(e, Error::Config { backend: "dns", .. }), "{e:?}");
                    assert!(e.to_string().contains(says), "{template:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn services_dns_cannot_carry_are_invalid_service_names() {
        let t = Template::new("{service}.service.{domain}", "consul").unwrap();
        for bad in ["x".repeat(64), "a..b".to_owned(), ".a".to_owned()] {
            match t.render(&svc(&bad)) {
                Ok(n) => panic!("{bad:?} rendered as {n}"),
                Err(Error::Invalid(v)) => {
                    assert_eq!(v.field(), &Field::ServiceName);
                    assert!(v.to_string().contains(&bad), "{v}");
                }
                Err(e) => panic!("{bad:?}: {e:?}"),
            }
        }
        // Long names fit while every label does.
        let ok = format!("{}.{}", "a".repeat(63), "b".repeat(63));
        assert!(t.render(&svc(&ok)).is_ok());
    }
}
