//! Behavioural tests for `phi_engine::stop::StopStrings`: matches across delta
//! boundaries, held-back prefixes, earliest-match rule, UTF-8 safety and the
//! "emitted text == text truncated at the first match" invariant.

use phi_engine::stop::{StopError, StopOutcome, StopStrings, MAX_STOP_STRINGS};

/// Feeds `deltas`, returns (all emitted text, matched index, whether it stopped before
/// the last delta). Calls `finish()` if no stop string matched.
fn run(stops: &[&str], deltas: &[&str]) -> (String, Option<usize>) {
    let mut s = StopStrings::new(stops.iter().copied()).unwrap();
    let mut out = String::new();
    let mut matched = None;
    for d in deltas {
        let o = s.push(d);
        out.push_str(&o.text);
        if o.matched.is_some() {
            assert!(matched.is_none(), "matched twice");
            matched = o.matched;
        }
    }
    if matched.is_none() {
        out.push_str(&s.finish());
    }
    (out, matched)
}

fn outcome(text: &str, matched: Option<usize>) -> StopOutcome {
    StopOutcome { text: text.to_string(), matched }
}

#[test]
fn stop_split_across_two_deltas() {
    let mut s = StopStrings::new(["</end>"]).unwrap();
    assert_eq!(s.push("Hello </e"), outcome("Hello ", None));
    assert_eq!(s.push("nd> world"), outcome("", Some(0)));
    assert!(s.is_done());
    assert_eq!(s.push("more"), outcome("", None));
    assert_eq!(s.finish(), "");
}

#[test]
fn stop_split_across_three_deltas() {
    let mut s = StopStrings::new(["</end>"]).unwrap();
    assert_eq!(s.push("Hi <"), outcome("Hi ", None));
    assert_eq!(s.push("/e"), outcome("", None));
    assert_eq!(s.push("nd>tail"), outcome("", Some(0)));
}

#[test]
fn stop_split_across_many_deltas() {
    let text = "The answer is 42.###STOP### ignored";
    let deltas: Vec<String> = text.chars().map(String::from).collect();
    let deltas: Vec<&str> = deltas.iter().map(String::as_str).collect();
    assert_eq!(run(&["###STOP###"], &deltas), ("The answer is 42.".to_string(), Some(0)));
}

#[test]
fn text_is_released_as_soon_as_it_cannot_start_a_stop() {
    let mut s = StopStrings::new(["STOP"]).unwrap();
    // Nothing here can begin "STOP": released immediately, nothing held.
    assert_eq!(s.push("hello world"), outcome("hello world", None));
    // "S" could begin it: held.
    assert_eq!(s.push(" yes S"), outcome(" yes ", None));
    assert_eq!(s.push("T"), outcome("", None));
    assert_eq!(s.finish(), "ST");
}

#[test]
fn stop_at_start() {
    assert_eq!(run(&["STOP"], &["STOP and more"]), (String::new(), Some(0)));
    assert_eq!(run(&["STOP"], &["ST", "OP", "x"]), (String::new(), Some(0)));
    let mut s = StopStrings::new(["STOP"]).unwrap();
    assert_eq!(s.push("STOP"), outcome("", Some(0)));
}

#[test]
fn partial_prefix_that_diverges_is_released() {
    let mut s = StopStrings::new(["</end>"]).unwrap();
    assert_eq!(s.push("a </e"), outcome("a ", None));
    assert_eq!(s.push("x b"), outcome("</ex b", None));
    assert_eq!(s.finish(), "");

    // Diverging, but a later position is itself a prefix again: "aaa" with stop "aab"
    // releases only the first "a", and the stop then matches at index 1.
    let mut s = StopStrings::new(["aab"]).unwrap();
    assert_eq!(s.push("a"), outcome("", None));
    assert_eq!(s.push("a"), outcome("", None));
    assert_eq!(s.push("a"), outcome("a", None));
    assert_eq!(s.push("b"), outcome("", Some(0)));
}

#[test]
fn earliest_match_wins() {
    // Both complete in the same delta: "lo" starts before "world".
    assert_eq!(run(&["world", "lo"], &["hello world"]), ("hel".to_string(), Some(1)));
    assert_eq!(run(&["lo", "world"], &["hello world"]), ("hel".to_string(), Some(0)));
    // Several stop strings, the one listed last occurs first.
    assert_eq!(run(&["zzz", "yy", "x", "b"], &["a", "bcx", "yyzzz"]), ("a".to_string(), Some(3)));
    // Same start: the one listed first is reported; the cut is the same.
    assert_eq!(run(&["ab", "abc"], &["xabc"]), ("x".to_string(), Some(0)));
    // A held partial of one stop string and a full match of another later on.
    assert_eq!(
        run(&["<|end|>", "\n\n"], &["text <|e", "x\n\nmore"]),
        ("text <|ex".to_string(), Some(1))
    );
}

#[test]
fn generation_stops_at_the_first_completed_stop_string() {
    // Documented semantics: a stop string completed in an earlier push ends generation
    // even if a longer stop string starting earlier could still have completed.
    assert_eq!(run(&["abcd", "bc"], &["a", "b", "c", "d"]), ("a".to_string(), Some(1)));
    // Within one push the earliest start wins.
    assert_eq!(run(&["abcd", "bc"], &["abcd"]), (String::new(), Some(0)));
}

#[test]
fn multibyte_stop_strings_and_text() {
    // Emoji stop string, CJK text around it.
    assert_eq!(
        run(&["🛑", "終わり"], &["你好", "世界🛑", "more"]),
        ("你好世界".to_string(), Some(0))
    );
    // CJK stop string split across deltas at char boundaries.
    let mut s = StopStrings::new(["終わり"]).unwrap();
    assert_eq!(s.push("これで終"), outcome("これで", None));
    assert_eq!(s.push("わ"), outcome("", None));
    assert_eq!(s.push("り。"), outcome("", Some(0)));

    // Held multibyte prefix that diverges is released whole.
    let mut s = StopStrings::new(["日本語"]).unwrap();
    assert_eq!(s.push("こんにちは日本"), outcome("こんにちは", None));
    assert_eq!(s.push("人です"), outcome("日本人です", None));

    // Characters sharing leading UTF-8 bytes with the stop string are not prefixes:
    // 😁 (F0 9F 98 81) vs 😀 (F0 9F 98 80), ê (C3 AA) vs é (C3 A9).
    let mut s = StopStrings::new(["😀x", "é!"]).unwrap();
    assert_eq!(s.push("a😁"), outcome("a😁", None));
    assert_eq!(s.push("ê"), outcome("ê", None));
    assert_eq!(s.push("😀"), outcome("", None));
    assert_eq!(s.push("y😀x"), outcome("😀y", Some(0)));
}

#[test]
fn finish_releases_held_text() {
    let mut s = StopStrings::new(["</end>", "\n\nUser:"]).unwrap();
    assert_eq!(s.push("abc </en"), outcome("abc ", None));
    assert_eq!(s.finish(), "</en");
    assert!(s.is_done());
    assert_eq!(s.push("d>"), outcome("", None));

    let mut s = StopStrings::new(["\n\nUser:"]).unwrap();
    assert_eq!(s.push("answer\n"), outcome("answer", None));
    assert_eq!(s.push("\nUs"), outcome("", None));
    assert_eq!(s.finish(), "\n\nUs");
}

#[test]
fn empty_and_too_many_stop_strings_are_rejected() {
    assert_eq!(StopStrings::new(["ok", ""]).unwrap_err(), StopError::Empty { index: 1 });
    let err = StopStrings::new([""]).unwrap_err();
    assert_eq!(err.param(), "stop");
    assert!(err.to_string().contains("`stop`"));
    let five = vec!["a"; MAX_STOP_STRINGS + 1];
    assert_eq!(StopStrings::new(five).unwrap_err(), StopError::TooMany { count: 5 });
    assert!(StopStrings::new(vec!["a"; MAX_STOP_STRINGS]).is_ok());
    assert!(StopStrings::new(Vec::<String>::new()).is_ok());
}

/// Splits `text` at the given char indices (clamped, deduplicated).
fn split_at_chars<'a>(text: &'a str, cuts: &[usize]) -> Vec<&'a str> {
    let bounds: Vec<usize> =
        text.char_indices().map(|(i, _)| i).chain(std::iter::once(text.len())).collect();
    let mut points: Vec<usize> = cuts.iter().map(|&c| bounds[c.min(bounds.len() - 1)]).collect();
    points.push(0);
    points.push(text.len());
    points.sort_unstable();
    points.dedup();
    points.windows(2).map(|w| &text[w[0]..w[1]]).collect()
}

#[test]
fn emitted_text_equals_text_truncated_at_first_match_for_all_chunkings() {
    // Stop strings here never overlap each other, so "first completed" and "earliest
    // occurrence" coincide for every chunking.
    let cases: &[(&str, &[&str])] = &[
        ("Hello, wörld! <|end|> trailing", &["<|end|>", "\n\n"]),
        ("日本語のテキスト🛑止まれ", &["🛑", "STOP"]),
        ("aaaab aab", &["aab"]),
        ("no stop in here at all é😀", &["😀x", "zz"]),
        ("x<|e<|en<|end|>", &["<|end|>"]),
        ("emoji 👩‍👩‍👧 then ##", &["##", "👧 t"]),
    ];
    let mut rng = 12345u64;
    for &(text, stops) in cases {
        let first = stops.iter().filter_map(|s| text.find(s)).min();
        let expected = &text[..first.unwrap_or(text.len())];
        let n_chars = text.chars().count();
        let check = |deltas: Vec<&str>| {
            assert_eq!(deltas.concat(), text);
            let (out, matched) = run(stops, &deltas);
            assert_eq!(out, expected, "stops {stops:?}, deltas {deltas:?}");
            assert_eq!(matched.is_some(), first.is_some());
        };
        // Whole, every 2-way and every 3-way split.
        check(vec![text]);
        for i in 0..=n_chars {
            check(split_at_chars(text, &[i]));
            for j in i..=n_chars {
                check(split_at_chars(text, &[i, j]));
            }
        }
        // One char per delta, and random chunkings.
        check(split_at_chars(text, &(0..=n_chars).collect::<Vec<_>>()));
        for _ in 0..200 {
            let cuts: Vec<usize> = (0..6)
                .map(|_| {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (rng >> 33) as usize % (n_chars + 1)
                })
                .collect();
            check(split_at_chars(text, &cuts));
        }
    }
}
