// ---- appended by scripts/fail_before_fix.sh: issue 18 test of main, on the old config ----
#[cfg(test)]
mod failfirst {
    use super::*;

    const MINIMAL: &str = "name = \"n\"\nrole = \"all\"\ndata_dir = \"d\"\n";

    /// Verbatim from main (defect 2).
    #[test]
    fn an_unset_token_variable_is_an_error_naming_it() {
        let mut c = NodeConfig::from_toml(MINIMAL).unwrap();
        c.auth.token_env = Some("QATFLOW_NODE_TEST_TOKEN_NEVER_SET".into());
        let err = c.token().unwrap_err().to_string();
        assert!(
            err.contains("QATFLOW_NODE_TEST_TOKEN_NEVER_SET") && err.contains("empty"),
            "{err}"
        );
    }
}
