//! Regular expressions shared by the CEL validation rules.
//!
//! They are macros, not constants, so that `concat!` can splice them into the rule text at
//! compile time. They use RE2 syntax (what CEL's `matches` runs) and avoid backslashes so the
//! same text is valid inside a CEL string literal.

/// A DNS-1123 label: what Kubernetes requires of namespace names and label values.
macro_rules! dns_label_re {
    () => {
        "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
    };
}

/// A container image reference as the distribution grammar defines it: an optional registry
/// host (with port), one or more lowercase path components, then a tag, a digest, or both.
macro_rules! image_ref_re {
    () => {
        concat!(
            "^(([a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*",
            "(:[0-9]+)?|[[][0-9a-fA-F:]+[]](:[0-9]+)?)/)?",
            "[a-z0-9]+(([._]|__|[-]+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|[-]+)[a-z0-9]+)*)*",
            "(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?",
            "(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
        )
    };
}

/// A registry location without scheme: `host[:port][/path]`.
macro_rules! registry_re {
    () => {
        concat!(
            "^[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?([.][a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?)*",
            "(:[0-9]+)?(/[a-z0-9]+(([._]|__|[-]+)[a-z0-9]+)*)*$"
        )
    };
}

/// A git remote: `https://`, `http://`, `ssh://` or `git://` URLs, or scp-like `user@host:path`.
macro_rules! git_url_re {
    () => {
        concat!(
            "^((https?|ssh|git)://[^[:space:]]+",
            "|[A-Za-z0-9._-]+@[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?:[^[:space:]]+)$"
        )
    };
}

/// A git branch, tag or commit: git's own ref-name characters, never option-like.
macro_rules! git_ref_re {
    () => {
        "^[A-Za-z0-9_][A-Za-z0-9._/+-]*$"
    };
}

/// An image tag as the distribution grammar defines it.
macro_rules! image_tag_re {
    () => {
        "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
    };
}

/// An environment variable name (what a build arg or platform env file may be called).
macro_rules! env_name_re {
    () => {
        "^[A-Za-z_][A-Za-z0-9_]*$"
    };
}

/// A path inside the repository: relative, without `..` components or whitespace.
macro_rules! repo_path_rule {
    () => {
        "!self.startsWith('/') && !self.split('/').exists(p, p == '..') && !self.matches('[[:space:]]')"
    };
}

pub(crate) use {
    dns_label_re, env_name_re, git_ref_re, git_url_re, image_ref_re, image_tag_re, registry_re,
    repo_path_rule,
};
