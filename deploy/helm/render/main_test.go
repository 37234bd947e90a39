package main

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"text/template"
)

func decode(t *testing.T, text string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(text), &v); err != nil {
		t.Fatal(err)
	}
	return v
}

// toYaml: block style as go-yaml writes it (sorted keys, sequences not
// indented under their key), strings quoted whenever plain would read back
// as another type.
func TestToYAML(t *testing.T) {
	cases := []struct{ in, want string }{
		{`{"b": 1, "a": "x"}`, "a: x\nb: 1"},
		{`{"limits": {"memory": "256Mi"}, "requests": {"cpu": "20m"}}`,
			"limits:\n  memory: \"256Mi\"\nrequests:\n  cpu: \"20m\""},
		{`[{"operator": "Exists"}]`, "- operator: Exists"},
		{`{"t": [{"key": "k", "operator": "In", "values": ["a", "b"]}]}`,
			"t:\n- key: k\n  operator: In\n  values:\n  - a\n  - b"},
		{`{"s": ["true", "no", "1.5", "", "on", "a: b", "#x", "ok"]}`,
			"s:\n- \"true\"\n- \"no\"\n- \"1.5\"\n- \"\"\n- \"on\"\n- \"a: b\"\n- \"#x\"\n- ok"},
		{`{"num": 1000000, "f": 2.5, "z": null, "e": {}, "l": [], "b": false}`,
			"b: false\ne: {}\nf: 2.5\nl: []\nnum: 1000000\nz: null"},
		{`[["a", "b"], "c"]`, "- - a\n  - b\n- c"},
		{`{"multi": "line1\nline2"}`, "multi: \"line1\\nline2\""},
	}
	for _, c := range cases {
		if got := toYAML(decode(t, c.in)); got != c.want {
			t.Errorf("toYaml(%s):\n got %q\nwant %q", c.in, got, c.want)
		}
	}
}

// Helm's coalescing: user values win, maps merge, a user null deletes.
func TestCoalesce(t *testing.T) {
	chart := decode(t, `{"a": 1, "m": {"x": 1, "y": 2}, "gone": {"k": 1}, "l": [1, 2]}`).(map[string]any)
	user := decode(t, `{"m": {"y": 3}, "gone": null, "l": [9]}`).(map[string]any)
	got := coalesce(user, chart)
	want := decode(t, `{"a": 1, "m": {"x": 1, "y": 3}, "l": [9]}`)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("coalesce: got %v want %v", got, want)
	}
}

func run(t *testing.T, text string, data any) (string, error) {
	t.Helper()
	tpl := template.New("t")
	tpl.Option("missingkey=zero")
	tpl.Funcs(funcMap())
	if _, err := tpl.Parse(text); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	err := tpl.Execute(&b, data)
	return strings.ReplaceAll(b.String(), "<no value>", ""), err
}

// The sprig and helm functions behave as upstream documents them.
func TestFunctions(t *testing.T) {
	data := decode(t, `{"empty": "", "name": "hearth", "n": 0, "port": 9464, "list": ["a"], "m": {"k": "v"}}`)
	cases := []struct{ tpl, want string }{
		{`{{ default "d" .empty }}|{{ default "d" .name }}|{{ default 7 .n }}|{{ default "d" .missing }}`, "d|hearth|7|d"},
		{`{{ quote .name }} {{ squote .name }} {{ quote .port }}`, `"hearth" 'hearth' "9464"`},
		{`{{ "a\nb" | indent 2 }}|{{ "a" | nindent 4 }}`, "  a\n  b|\n    a"},
		{`{{ trunc 3 "abcdef" }} {{ trunc -2 "abcdef" }} {{ trimSuffix "-" "a-" }}`, "abc ef a"},
		{`{{ kindIs "string" .name }} {{ kindIs "map" .m }} {{ kindIs "invalid" .missing }} {{ kindIs "float64" .port }}`,
			"true true true true"},
		{`{{ has "b" (splitList " " "a b c") }} {{ has "z" .list }}`, "true false"},
		{`{{ toJson .m }} {{ toJson .port }} {{ toJson .list }}`, `{"k":"v"} 9464 ["a"]`},
		{`{{ int .port }} {{ atoi "30" }} {{ "1.30+" | trimSuffix "+" }}`, "9464 30 1.30"},
		{`{{ ternary "y" "n" true }}{{ ternary "y" "n" false }} {{ empty .list }} {{ empty .empty }}`, "yn false true"},
		{`{{ sha256sum "" }}`, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
		{`{{ omit .m "k" | toJson }} {{ hasKey .m "k" }}`, "{} true"},
	}
	for _, c := range cases {
		got, err := run(t, c.tpl, data)
		if err != nil || got != c.want {
			t.Errorf("%s:\n got %q (%v)\nwant %q", c.tpl, got, err, c.want)
		}
	}
	if _, err := run(t, `{{ required "name is required" .empty }}`, data); err == nil ||
		!strings.Contains(err.Error(), "name is required") {
		t.Errorf("required: %v", err)
	}
	if _, err := run(t, `{{ fail "stop here" }}`, data); err == nil || !strings.Contains(err.Error(), "stop here") {
		t.Errorf("fail: %v", err)
	}
}
