//! Property tests of the config parser and of property strings (issue 9): a config that
//! parses is written back to text that parses to the same config (and, when parsed
//! strictly, passes `validate`); a property string that prints reads back as the pairs it
//! was printed from; neither parser panics on any input.
//!
//! CI runs [`CI_CASES`] cases per property, a few seconds in all. To search longer, set
//! `PROPTEST_CASES`, e.g. `PROPTEST_CASES=100000 cargo nextest run prop_`. A failing input
//! is shrunk, saved under `proptest-regressions/` and tried first on the next run.

use proptest::prelude::*;

use super::*;

const CI_CASES: u32 = 256;

/// `with_cases` would override `PROPTEST_CASES` (only `default()` reads it), so the
/// variable is honoured here.
fn config() -> ProptestConfig {
    if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(CI_CASES)
    }
}

/// Short texts that hit the corner cases: separators and quotes, `%XX` escapes, control
/// characters, non-ASCII, and anything at all.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,12}",
        "[a-z0-9,=\"\\\\ :%#\\[\\]]{0,12}",
        "[%0-9A-Fa-f]{0,6}",
        "[\\x00-\\x1f\\x7f\u{85}\u{e9}a ]{0,4}",
        any::<String>().prop_map(|s| s.chars().take(12).collect()),
    ]
}

/// One line of a config file, biased toward lines the parser accepts.
fn line() -> impl Strategy<Value = String> {
    let special_key = prop::sample::select(vec![
        "cdrom",
        "ide2",
        "lock",
        "vmid",
        "delete",
        "description",
        "snapstate",
        "digest",
        "parent",
    ]);
    let value = prop_oneof![
        text(),
        prop::sample::select(vec!["create", "migrate", "100", "0100", "local:iso/x.iso"])
            .prop_map(String::from),
    ];
    let header = prop::sample::select(vec![
        "[PENDING]",
        "[pending] ",
        "[special:cloudinit]",
        "[special:FLEECING]",
        "[special:foo]",
        "[s1]",
        "[Snap_1]",
        "[1bad]",
        "[x]",
    ]);
    let plain_value = prop_oneof![3 => "[!-~][ -~]{0,10}".boxed(), 1 => text().boxed()];
    prop_oneof![
        1 => Just(String::new()),
        2 => text().prop_map(|t| format!("#{t}")),
        8 => ("[a-z][a-z_-]{0,5}[0-9]{0,2}", "[ \t]{0,2}", plain_value)
            .prop_map(|(k, sp, v)| format!("{k}:{sp}{v}")),
        2 => (special_key, value).prop_map(|(k, v)| format!("{k}: {v}")),
        2 => header.prop_map(String::from),
        1 => text(),
    ]
}

fn config_text() -> impl Strategy<Value = String> {
    (prop::collection::vec(line(), 0..16), any::<bool>())
        .prop_map(|(lines, crlf)| lines.join(if crlf { "\r\n" } else { "\n" }))
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z][a-z0-9_-]{0,6}",
        1 => "[a-z,= \"._\\-\\r]{0,4}",
    ]
}

fn pairs() -> impl Strategy<Value = Vec<(String, String)>> {
    let good_value = "[A-Za-z0-9:/._ +-]{1,10}";
    let pair = (
        prop_oneof![4 => key(), 1 => Just("file".to_string())],
        prop_oneof![3 => good_value.boxed(), 1 => text().boxed()],
    );
    prop::collection::vec(pair, 0..6)
}

/// What [`print_property_string`] promises: the default key's pair first, the rest by key.
fn print_order(
    mut pairs: Vec<(String, String)>,
    default_key: Option<&str>,
) -> Vec<(String, String)> {
    pairs.sort_by(|a, b| {
        let rank = |k: &String| (Some(k.as_str()) != default_key, k.clone());
        rank(&a.0).cmp(&rank(&b.0))
    });
    pairs
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn prop_config_parse_write_parse_round_trips(text in config_text()) {
        for strict in [false, true] {
            let Ok(conf) = parse_config(&text, strict) else { continue };
            if strict {
                prop_assert_eq!(conf.validate(), Ok(()));
            }
            let written = conf.write();
            let again = VmConfig::parse(&written);
            prop_assert!(again.is_ok(), "{:?} does not parse: {:?}", written, again);
            let Ok(mut again) = again else { continue };
            again.digest.clone_from(&conf.digest);
            prop_assert_eq!(&again, &conf, "written as {:?}", written);
            prop_assert_eq!(again.write(), written);
        }
    }

    #[test]
    fn prop_config_parser_never_panics(text in any::<String>()) {
        let _ = VmConfig::parse(&text);
        let _ = VmConfig::parse_strict(&text);
    }

    #[test]
    fn prop_property_string_print_parse_round_trips(
        pairs in pairs(),
        default_key in prop::option::of(Just("file")),
    ) {
        match print_property_string(&pairs, default_key) {
            Ok(printed) => {
                let back = parse_property_string(&printed, default_key);
                prop_assert_eq!(back, Ok(print_order(pairs.clone(), default_key)), "printed {:?}", printed);
                if default_key.is_some() {
                    prop_assert_eq!(parse_drive(&printed).is_ok(), true);
                }
            }
            Err(e) => prop_assert!(matches!(e, ConfigError::Unprintable { .. }), "{e:?}"),
        }
    }

    #[test]
    fn prop_plain_pairs_always_print(
        pairs in prop::collection::btree_map("[a-z][a-z0-9_-]{0,6}", "[A-Za-z0-9:/._+-]{1,10}", 0..6),
    ) {
        let pairs: Vec<(String, String)> = pairs.into_iter().collect();
        prop_assert!(print_property_string(&pairs, Some("file")).is_ok());
        prop_assert!(print_property_string(&pairs, None).is_ok());
    }

    #[test]
    fn prop_property_string_parser_never_panics(s in any::<String>(), t in text()) {
        for input in [s.as_str(), t.as_str()] {
            let _ = parse_property_string(input, None);
            let _ = parse_drive(input);
            if let Ok(parsed) = parse_property_string(input, Some("file")) {
                // what parsed and prints reads back the same
                if let Ok(printed) = print_property_string(&parsed, Some("file")) {
                    prop_assert_eq!(
                        parse_property_string(&printed, Some("file")),
                        Ok(print_order(parsed, Some("file")))
                    );
                }
            }
        }
    }
}
